"""Mistral (``MistralForCausalLM``): Llama's layout; a sliding window lives in the mask (and the
cache layers) Hugging Face builds, so the exit head and the K/V fill are Llama's."""

from __future__ import annotations

from adainfer.models.family import ModelFamily
from adainfer.models.llama import kv_fill, rms_lens_head

FAMILY = ModelFamily(
    model_type="mistral",
    causal_lm="MistralForCausalLM",
    decoder=lambda m: m.model,
    lens_head=rms_lens_head,
    kv_fill=kv_fill,
)
