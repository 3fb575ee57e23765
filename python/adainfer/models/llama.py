"""Llama (``LlamaForCausalLM``): RMSNorm, rotary positions, grouped K/V heads."""

from __future__ import annotations

import torch
from torch import nn

from adainfer.models.family import ModelFamily, apply_rope, split_heads
from adainfer_kernels.head import ReadoutHead


def rms_lens_head(model: nn.Module) -> ReadoutHead:
    """Final RMSNorm (fp32 statistics, cast back, then the weight) and the LM head."""
    norm = model.model.norm
    return ReadoutHead(
        weight=model.get_output_embeddings().weight,
        norm="rms",
        norm_weight=norm.weight,
        eps=float(norm.variance_epsilon),
    )


def kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of a Llama layer for rows that skipped it: input norm -> k/v projections -> RoPE on K.

    The same operations in the same order as ``LlamaAttention.forward``, so a row frozen at its exit
    state gets the same K/V whether it is compacted out or kept in the batch.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = split_heads(attn.k_proj(x), attn.head_dim)
    v = split_heads(attn.v_proj(x), attn.head_dim)
    return apply_rope(k, position_embeddings), v


FAMILY = ModelFamily(
    model_type="llama",
    causal_lm="LlamaForCausalLM",
    decoder=lambda m: m.model,
    lens_head=rms_lens_head,
    kv_fill=kv_fill,
)
