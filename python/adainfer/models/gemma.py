"""Gemma (``GemmaForCausalLM``): embeddings scaled by sqrt(d) inside the decoder (Hugging Face's
code, before the layers), RMSNorm with a (1 + w) weight computed in fp32 and cast once, tied LM head."""

from __future__ import annotations

from torch import nn

from adainfer.models.family import ModelFamily
from adainfer.models.llama import kv_fill
from adainfer_kernels.head import ReadoutHead


def lens_head(model: nn.Module) -> ReadoutHead:
    """Final Gemma RMSNorm (``rms_offset``: x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32) and the LM head."""
    norm = model.model.norm
    return ReadoutHead(
        weight=model.get_output_embeddings().weight,
        norm="rms_offset",
        norm_weight=norm.weight,
        eps=float(norm.eps),
        logit_softcap=getattr(model.config, "final_logit_softcapping", None),
    )


# The layers' input norm is the same Gemma RMSNorm module, so Llama's K/V fill applies it exactly.
FAMILY = ModelFamily(
    model_type="gemma",
    causal_lm="GemmaForCausalLM",
    decoder=lambda m: m.model,
    lens_head=lens_head,
    kv_fill=kv_fill,
)
