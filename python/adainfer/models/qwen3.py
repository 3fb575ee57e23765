"""Qwen3 (``Qwen3ForCausalLM``): Llama's layout with an RMSNorm over each head's q and k before RoPE."""

from __future__ import annotations

import torch
from torch import nn

from adainfer.models.family import ModelFamily, apply_rope, split_heads
from adainfer.models.llama import rms_lens_head


def kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of a Qwen3 layer for rows that skipped it: input norm -> k/v projections -> k_norm per
    head -> RoPE on K, in ``Qwen3Attention.forward``'s order (the norm runs on (F, T, H, D))."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = attn.k_norm(attn.k_proj(x).view(*x.shape[:-1], -1, attn.head_dim)).transpose(1, 2)
    v = split_heads(attn.v_proj(x), attn.head_dim)
    return apply_rope(k, position_embeddings), v


FAMILY = ModelFamily(
    model_type="qwen3",
    causal_lm="Qwen3ForCausalLM",
    decoder=lambda m: m.model,
    lens_head=rms_lens_head,
    kv_fill=kv_fill,
)
