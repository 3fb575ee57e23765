"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout with biased q/k/v projections and optional
sliding-window layers (``config.layer_types``; the decoder passes those layers their own mask)."""

from __future__ import annotations

from adainfer.models.family import ModelFamily
from adainfer.models.llama import kv_fill, rms_lens_head

# The k/v projections carry their bias (nn.Linear applies it), so Llama's K/V fill is Qwen2's.
FAMILY = ModelFamily(
    model_type="qwen2",
    causal_lm="Qwen2ForCausalLM",
    decoder=lambda m: m.model,
    lens_head=rms_lens_head,
    kv_fill=kv_fill,
)
