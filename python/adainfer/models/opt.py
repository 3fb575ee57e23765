"""OPT (``OPTForCausalLM``): LayerNorm, learned positions added before the layers, optional
``project_in``/``project_out`` (OPT-350m) and post-LN layers (``do_layer_norm_before=False``)."""

from __future__ import annotations

import torch
from torch import nn

from adainfer.models.family import ModelFamily, split_heads
from adainfer_kernels.head import ReadoutHead


def lens_head(model: nn.Module) -> ReadoutHead:
    """Final LayerNorm (absent in post-LN models), ``project_out`` when present, the tied LM head."""
    decoder = model.model.decoder
    final_ln = decoder.final_layer_norm
    return ReadoutHead(
        weight=model.get_output_embeddings().weight,
        norm="layer" if final_ln is not None else "none",
        norm_weight=final_ln.weight if final_ln is not None else None,
        norm_bias=final_ln.bias if final_ln is not None else None,
        eps=float(final_ln.eps) if final_ln is not None else 1e-5,
        project_out=decoder.project_out.weight if decoder.project_out is not None else None,
    )


def kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of an OPT layer for rows that skipped it (positions were added before the layers)."""
    attn = layer.self_attn
    x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    return split_heads(attn.k_proj(x), attn.head_dim), split_heads(attn.v_proj(x), attn.head_dim)


FAMILY = ModelFamily(
    model_type="opt",
    causal_lm="OPTForCausalLM",
    decoder=lambda m: m.model.decoder,
    lens_head=lens_head,
    kv_fill=kv_fill,
)
