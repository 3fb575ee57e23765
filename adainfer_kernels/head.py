"""The data the exit head needs: how a model decodes a hidden state, and what comes out.

``ExitHead`` describes the model's own decode path (the "logit lens"): final norm, optional
``project_out`` (OPT-350m), LM-head weight, and an optional vocabulary subset (a task's label
tokens) with an additive bias per subset row (the per-layer label-bias correction).
``LinearScore`` is the stop classifier's decision function over the features. ``ExitSignals`` is
what ``exit_head`` returns, one entry per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

NormKind = Literal["rms", "layer", "none"]
NORM_KINDS: tuple[str, ...] = ("rms", "layer", "none")
FEATURES: tuple[str, ...] = ("top_prob", "gap")


@dataclass(frozen=True)
class ExitHead:
    """A model's decode path from a hidden state to logits.

    Attributes:
        weight: (V, d_out) LM-head weight (tied embeddings are fine), bf16/fp16/fp32.
        norm: ``"rms"`` (Llama RMSNorm: fp32 statistics, cast back to the input dtype, then the
            weight), ``"layer"`` (LayerNorm with bias, OPT) or ``"none"``.
        norm_weight: (d,) norm weight, required unless ``norm == "none"``.
        norm_bias: (d,) LayerNorm bias (``"layer"`` only; None means zero).
        eps: the norm's epsilon.
        project_out: (d_out, d) weight of a bias-free linear map applied after the norm (OPT's
            ``project_out`` when ``word_embed_proj_dim != hidden_size``), or None (then d_out == d).
        vocab_subset: (K,) int64 row ids of ``weight`` to decode onto (e.g. a task's label tokens),
            or None for the full vocabulary. Ids must be distinct.
        subset_bias: (K,) fp32 added to the subset logits before the softmax statistics, or None.
    """

    weight: torch.Tensor
    norm: NormKind = "none"
    norm_weight: torch.Tensor | None = None
    norm_bias: torch.Tensor | None = None
    eps: float = 1e-5
    project_out: torch.Tensor | None = None
    vocab_subset: torch.Tensor | None = None
    subset_bias: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        """d: the size of the hidden states this head takes."""
        if self.project_out is not None:
            return self.project_out.shape[1]
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        """V: rows of the LM head (the full vocabulary, also when a subset is used)."""
        return self.weight.shape[0]

    @property
    def n_candidates(self) -> int:
        """How many logits the softmax statistics run over (K with a subset, else V)."""
        return self.vocab_size if self.vocab_subset is None else self.vocab_subset.numel()


@dataclass(frozen=True)
class LinearScore:
    """The stop classifier's linear decision function, computed in the exit head's pass.

    ``score = w_top_prob * top_prob + w_gap * gap + bias``; a row is finished when
    ``score > 0`` after the caller folds its threshold (and any per-layer term) into ``bias``.
    """

    w_top_prob: float
    w_gap: float
    bias: float

    def __call__(self, top_prob: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        return self.w_top_prob * top_prob + self.w_gap * gap + self.bias


@dataclass(frozen=True)
class ExitSignals:
    """Per-row outputs of the exit head, each of shape (R,).

    Attributes:
        top_prob: fp32 top-1 softmax probability over the candidates.
        gap: fp32 top-1 minus top-2 probability (0 on an exact tie; equals ``top_prob`` when there
            is a single candidate).
        argmax: int64 id of the top-1 candidate in the full vocabulary; on an exact tie the lower
            vocabulary position among the candidates (the lower subset position with a subset).
        score: fp32 classifier decision value, or None when no classifier was given.

    Rows whose hidden state holds NaN or inf get ``top_prob = gap = score = NaN`` and
    ``argmax = -1``: such a row never passes a ``score > threshold`` test.
    """

    top_prob: torch.Tensor
    gap: torch.Tensor
    argmax: torch.Tensor
    score: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.top_prob.shape[0]
