"""The exit head of a Hugging Face model: its own final norm, ``project_out`` and LM head.

``exit_head_for(model)`` reads them off a ``LlamaForCausalLM`` or ``OPTForCausalLM`` so that the
exit check decodes an intermediate hidden state exactly as the model decodes its last one.
"""

from __future__ import annotations

import torch

from adainfer_kernels.head import ExitHead

SUPPORTED_MODEL_TYPES = ("llama", "opt")


def _check_supported(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return model_type


def exit_head_for(
    model,
    vocab_subset: torch.Tensor | None = None,
    subset_bias: torch.Tensor | None = None,
) -> ExitHead:
    """The ``ExitHead`` of ``model`` (Llama: RMSNorm; OPT: LayerNorm or none, + ``project_out``).

    Args:
        model: ``LlamaForCausalLM`` or ``OPTForCausalLM``.
        vocab_subset: (K,) token ids to decode onto (e.g. a task's label words), or None.
        subset_bias: (K,) fp32 bias added to the subset logits, or None.
    """
    model_type = _check_supported(model)
    weight = model.get_output_embeddings().weight
    device = weight.device
    if vocab_subset is not None:
        vocab_subset = torch.as_tensor(vocab_subset, dtype=torch.int64, device=device)
    if subset_bias is not None:
        subset_bias = torch.as_tensor(subset_bias, dtype=torch.float32, device=device)
    if model_type == "llama":
        norm = model.model.norm
        return ExitHead(
            weight=weight,
            norm="rms",
            norm_weight=norm.weight,
            eps=float(norm.variance_epsilon),
            vocab_subset=vocab_subset,
            subset_bias=subset_bias,
        )
    decoder = model.model.decoder
    final_ln = decoder.final_layer_norm
    project_out = decoder.project_out.weight if decoder.project_out is not None else None
    return ExitHead(
        weight=weight,
        norm="layer" if final_ln is not None else "none",
        norm_weight=final_ln.weight if final_ln is not None else None,
        norm_bias=final_ln.bias if final_ln is not None else None,
        eps=float(final_ln.eps) if final_ln is not None else 1e-5,
        project_out=project_out,
        vocab_subset=vocab_subset,
        subset_bias=subset_bias,
    )
