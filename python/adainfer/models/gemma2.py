"""Gemma2 (``Gemma2ForCausalLM``): Gemma plus alternating sliding-window / global layers, attention
logit soft-capping (inside attention: K/V are unaffected) and final-logit soft-capping
(``cap * tanh(z / cap)``), which the exit head applies so that its softmax statistics are those of
the model's own output."""

from __future__ import annotations

from adainfer.models.family import ModelFamily
from adainfer.models.gemma import lens_head
from adainfer.models.llama import kv_fill

FAMILY = ModelFamily(
    model_type="gemma2",
    causal_lm="Gemma2ForCausalLM",
    decoder=lambda m: m.model,
    lens_head=lens_head,
    kv_fill=kv_fill,
)
