"""Phi-3 (``Phi3ForCausalLM``): one fused qkv projection and, optionally, partial rotary embeddings."""

from __future__ import annotations

import torch
from torch import nn

from adainfer.models.family import ModelFamily, apply_rope, split_heads
from adainfer.models.llama import rms_lens_head


def kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of a Phi-3 layer for rows that skipped it: input norm -> the k and v slices of the fused
    qkv projection -> RoPE on K (partial when cos/sin are narrower than a head), as ``Phi3Attention``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    qkv = attn.qkv_proj(x)
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.num_key_value_heads * attn.head_dim
    k = split_heads(qkv[..., q_size : q_size + kv_size], attn.head_dim)
    v = split_heads(qkv[..., q_size + kv_size :], attn.head_dim)
    return apply_rope(k, position_embeddings), v


FAMILY = ModelFamily(
    model_type="phi3",
    causal_lm="Phi3ForCausalLM",
    decoder=lambda m: m.model,
    lens_head=rms_lens_head,
    kv_fill=kv_fill,
)
