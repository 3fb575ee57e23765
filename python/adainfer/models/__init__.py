"""The registry of model families: one module per family, one ``ModelFamily`` each.

    family_for(model)          # the family of a *ForCausalLM instance, or a clear ValueError
    lens_head(model, ...)      # its lens head (final norm, project_out, LM head), optionally on a subset

To add a family: a module beside ``llama.py`` that defines ``FAMILY = ModelFamily(...)``, and one
entry in ``_MODULES``. Nothing else in the runtime knows about model types.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adainfer.models import gemma, gemma2, llama, mistral, opt, phi3, qwen2, qwen3
from adainfer.models.family import ModelFamily
from adainfer_kernels.head import ReadoutHead

__all__ = ["FAMILIES", "ModelFamily", "family_for", "lens_head", "supported_model_types"]

_MODULES = (llama, opt, qwen2, qwen3, mistral, gemma, gemma2, phi3)
FAMILIES: dict[str, ModelFamily] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def family_for(model: nn.Module) -> ModelFamily:
    """The ``ModelFamily`` of ``model`` (by ``config.model_type``); ValueError naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        classes = ", ".join(FAMILIES[t].causal_lm for t in supported_model_types())
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(supported_model_types())}); "
            f"AdaInfer patches {classes}"
        )
    return FAMILIES[model_type]


def lens_head(
    model: nn.Module,
    vocab_subset: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
) -> ReadoutHead:
    """The ``ReadoutHead`` of ``model``, decoding exactly as the model decodes its last hidden state.

    Args:
        model: a ``*ForCausalLM`` of a supported family.
        vocab_subset: (K,) token ids to decode onto (e.g. a task's label words), or None.
        logit_bias: (K,) fp32 bias added to the subset logits, or None.
    """
    head = family_for(model).lens_head(model)
    device = head.weight.device
    if vocab_subset is not None:
        vocab_subset = torch.as_tensor(vocab_subset, dtype=torch.int64, device=device)
    if logit_bias is not None:
        logit_bias = torch.as_tensor(logit_bias, dtype=torch.float32, device=device)
    if vocab_subset is None and logit_bias is None:
        return head
    return dataclasses.replace(head, vocab_subset=vocab_subset, logit_bias=logit_bias)
