"""The data the exit head needs: how a model decodes a hidden state, and what comes out.

``ReadoutHead`` describes the model's own decode path (the "logit lens"): final norm, optional
``project_out`` (OPT-350m), LM-head weight, and an optional vocabulary subset (a task's label
tokens) with an additive bias per subset row (the per-layer label-bias correction).
``StopRule`` is the stop rule's decision function over the features (``NEVER_STOP`` and
``ALWAYS_STOP`` are its two constant forms). ``ExitSignals`` is what ``exit_head`` returns, one
entry per row. ``decode_rows`` is the norm + ``project_out`` part of the decode path, with Hugging
Face's ops, shared by every backend; ``kernel_rows`` says what a fused kernel is fed (the caller's
rows and the kernel's norm code, or rows ``decode_rows`` already normed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from adainfer_kernels._cache import IdentityCache

NormKind = Literal["rms", "rms_offset", "layer", "none"]
NORM_KINDS: tuple[str, ...] = ("rms", "rms_offset", "layer", "none")
# The kernels' encoding of the norms they apply themselves. "rms_offset" (Gemma) is not among them:
# decode_rows applies it with Hugging Face's ops and the kernels get pre-normed rows (kernel_rows).
NORM_CODES = {"none": 0, "rms": 1, "layer": 2}
FEATURES: tuple[str, ...] = ("top_prob", "gap")


@dataclass(frozen=True)
class ReadoutHead:
    """A model's decode path from a hidden state to logits.

    Attributes:
        weight: (V, d_out) LM-head weight (tied embeddings are fine), bf16/fp16/fp32.
        norm: ``"rms"`` (Llama RMSNorm: fp32 statistics, cast back to the input dtype, then the
            weight), ``"rms_offset"`` (Gemma / Gemma2 RMSNorm: everything in fp32, times
            ``1 + weight``, one rounding to the input dtype at the end), ``"layer"`` (LayerNorm
            with bias, OPT) or ``"none"``.
        norm_weight: (d,) norm weight, required unless ``norm == "none"`` (for ``"rms_offset"``
            the stored weight w of ``1 + w``, as in the model's state dict).
        norm_bias: (d,) LayerNorm bias (``"layer"`` only; None means zero).
        eps: the norm's epsilon.
        project_out: (d_out, d) weight of a bias-free linear map applied after the norm (OPT's
            ``project_out`` when ``word_embed_proj_dim != hidden_size``), or None (then d_out == d).
        vocab_subset: (K,) int64 row ids of ``weight`` to decode onto (e.g. a task's label tokens),
            or None for the full vocabulary. Ids must be distinct.
        logit_bias: (K,) fp32 added to the subset logits before the softmax statistics, or None.
        logit_softcap: final-logit soft-capping (Gemma2's ``config.final_logit_softcapping``, e.g.
            30.0), or None for none: each candidate logit is ``cap * tanh(<x, W_c> / cap)``
            (computed in fp32 inside the vocabulary pass), then ``logit_bias`` is added. A
            finite float > 0.
    """

    weight: torch.Tensor
    norm: NormKind = "none"
    norm_weight: torch.Tensor | None = None
    norm_bias: torch.Tensor | None = None
    eps: float = 1e-5
    project_out: torch.Tensor | None = None
    vocab_subset: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    logit_softcap: float | None = None

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
class StopRule:
    """The stop rule's linear decision function, computed in the exit head's pass.

    ``score = w_top_prob * top_prob + w_gap * gap + offset``; a row is finished when
    ``score > 0`` after the caller folds its threshold (and any per-layer term) into ``offset``.
    """

    w_top_prob: float
    w_gap: float
    offset: float

    def __call__(self, top_prob: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        return self.w_top_prob * top_prob + self.w_gap * gap + self.offset


# The two constant rules: score -1 never stops (a NaN score, from a non-finite row, never stops
# either); score +1 always stops.
NEVER_STOP = StopRule(w_top_prob=0.0, w_gap=0.0, offset=-1.0)
ALWAYS_STOP = StopRule(w_top_prob=0.0, w_gap=0.0, offset=1.0)


@dataclass(frozen=True)
class ExitSignals:
    """Per-row outputs of the exit head, each of shape (R,).

    Attributes:
        top_prob: fp32 top-1 softmax probability over the candidates.
        gap: fp32 top-1 minus top-2 probability (0 on an exact tie; equals ``top_prob`` when there
            is a single candidate).
        argmax: int64 id of the top-1 candidate in the full vocabulary; on an exact tie the lower
            vocabulary position among the candidates (the lower subset position with a subset).
        score: fp32 value of the ``StopRule`` passed to ``exit_head``, or None when none was.

    Rows whose hidden state holds NaN or inf get ``top_prob = gap = score = NaN`` and
    ``argmax = -1``: such a row never passes a ``score > threshold`` test.
    """

    top_prob: torch.Tensor
    gap: torch.Tensor
    argmax: torch.Tensor
    score: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.top_prob.shape[0]


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN = 1.1754943508222875e-38  # smallest normal fp32: a smaller cap is 0 or subnormal in fp32


def _check_model_tensor(name: str, t: object, hidden: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A head tensor that enters the decode path: right type, shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {shape} is needed")
    if t.dtype != hidden.dtype:
        raise TypeError(
            f"{name} is {t.dtype} but hidden is {hidden.dtype}: the exit head computes in the model's dtype, "
            f"so pass hidden states and head weights of one dtype (e.g. hidden.to({t.dtype}))"
        )
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}: move them to one device")


def check_exit_head_inputs(hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None = None) -> None:
    """Every input check of ``exit_head``, in one place (all backends call it).

    Raises TypeError / ValueError / IndexError / RuntimeError naming the problem and the fix:
    hidden not 2-D or not bf16/fp16/fp32; mismatched d, V, dtypes or devices; norm tensors missing,
    misplaced or of the wrong shape; non-finite or negative eps; vocabulary subset ids not 1-D
    integers, empty, out of range or duplicated; logit bias without a subset, of the wrong shape or
    not fp32; a logit soft-cap that is not a finite float > 0; a stop rule that is not a ``StopRule``
    or has non-finite coefficients; inputs that require grad while autograd is recording (the exit
    head has no backward).

    The subset-id range and duplicate checks read the ids (a host sync on CUDA): their result is
    cached per subset tensor (identity and version), so a head built once costs one sync.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(head, ReadoutHead):
        raise TypeError(f"head must be a ReadoutHead, got {type(head).__name__}")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D (rows, d), got shape {tuple(hidden.shape)}; "
            "pass the last token's hidden state of each row, e.g. h[:, -1]"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if head.norm not in NORM_KINDS:
        raise ValueError(f"norm {head.norm!r} is not supported (supported: {', '.join(NORM_KINDS)})")

    w = head.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"head.weight must be a 2-D (V, d) tensor, got {shape}")
    n_vocab, d_out = w.shape
    if n_vocab == 0 or d_out == 0:
        raise ValueError(f"head.weight of shape {tuple(w.shape)} is empty")
    _check_model_tensor("head.weight", w, hidden, (n_vocab, d_out))

    d = d_out
    if head.project_out is not None:
        p = head.project_out
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[0] != d_out:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"head.project_out must be ({d_out}, d) to feed a weight of shape {tuple(w.shape)}, got {shape}"
            )
        d = p.shape[1]
        _check_model_tensor("head.project_out", p, hidden, (d_out, d))
    if hidden.shape[1] != d:
        via = " (the input size of project_out)" if head.project_out is not None else ""
        raise ValueError(f"hidden has d={hidden.shape[1]} but the head takes d={d}{via}")

    if head.norm == "none":
        if head.norm_weight is not None or head.norm_bias is not None:
            raise ValueError(
                "norm='none' takes no norm_weight or norm_bias; set norm='rms', 'rms_offset' or 'layer' to use them"
            )
    else:
        if head.norm_weight is None:
            raise ValueError(f"norm={head.norm!r} needs norm_weight of shape ({d},)")
        _check_model_tensor("head.norm_weight", head.norm_weight, hidden, (d,))
        if head.norm_bias is not None:
            if head.norm != "layer":
                raise ValueError(f"norm_bias is only used with norm='layer' (norm={head.norm!r} has no bias)")
            _check_model_tensor("head.norm_bias", head.norm_bias, hidden, (d,))
        eps = head.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) <= _FLT_MAX:
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")

    ids = head.vocab_subset
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            desc = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"vocab_subset must be a 1-D int64 (or int32) tensor of row ids, got {desc}")
        if ids.numel() == 0:
            raise ValueError("vocab_subset is empty: pass at least one row id, or None for the full vocabulary")
        if ids.device != hidden.device:
            raise ValueError(f"vocab_subset is on {ids.device} but hidden is on {hidden.device}")
    if head.logit_bias is not None:
        b = head.logit_bias
        if ids is None:
            raise ValueError("logit_bias needs a vocab_subset (it is one bias per subset row)")
        if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.shape[0] != ids.shape[0]:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"logit_bias must have shape ({ids.shape[0]},), one per subset row, got {shape}")
        if b.dtype != torch.float32:
            raise TypeError(f"logit_bias must be fp32, got {b.dtype} (use logit_bias.float())")
        if b.device != hidden.device:
            raise ValueError(f"logit_bias is on {b.device} but hidden is on {hidden.device}")

    cap = head.logit_softcap
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, (int, float)) or not _FLT_MIN <= float(cap) <= _FLT_MAX
    ):
        raise ValueError(
            f"logit_softcap must be None or a finite float > 0 (e.g. Gemma2's final_logit_softcapping, 30.0), "
            f"got {cap!r}"
        )

    if stop_rule is not None:
        if not isinstance(stop_rule, StopRule):
            raise TypeError(f"stop_rule must be a StopRule or None, got {type(stop_rule).__name__}")
        for name in ("w_top_prob", "w_gap", "offset"):
            value = getattr(stop_rule, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(float(value)) <= _FLT_MAX:
                raise ValueError(f"stop_rule.{name} must be a finite number, got {value!r}")

    if torch.is_grad_enabled():
        tensors = {"hidden": hidden, "head.weight": w, "head.norm_weight": head.norm_weight}
        tensors |= {"head.norm_bias": head.norm_bias, "head.project_out": head.project_out}
        tensors["head.logit_bias"] = head.logit_bias
        grad = [name for name, t in tensors.items() if t is not None and t.requires_grad]
        if grad:
            raise RuntimeError(
                f"exit_head is inference-only (no backward) but {', '.join(grad)} require grad while autograd "
                "is recording: call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
            )

    if ids is not None:
        lo, hi = _SUBSET_RANGES.get((ids,), lambda: _subset_range(ids))
        if lo < 0 or hi >= n_vocab:
            bad = ids[(ids < 0) | (ids >= n_vocab)][:5].tolist()
            raise IndexError(f"vocab_subset ids must lie in [0, {n_vocab}) (rows of head.weight); got e.g. {bad}")


# (min, max) of each subset tensor seen, after checking that its ids are distinct: reading the ids is
# a host sync on CUDA, so it happens once per subset tensor, not on every exit check.
_SUBSET_RANGES = IdentityCache(max_entries=64)


def _subset_range(ids: torch.Tensor) -> tuple[int, int]:
    """(min, max) of the subset ids; raises when an id appears twice."""
    sorted_ids = ids.sort().values
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if dup.numel():
        raise ValueError(f"vocab_subset ids must be distinct; duplicated: {dup.unique()[:5].tolist()}")
    return int(sorted_ids[0]), int(sorted_ids[-1])


def decode_rows(hidden: torch.Tensor, head: ReadoutHead) -> torch.Tensor:
    """(R, d_out) input of the LM head: the norm and ``project_out`` with Hugging Face's ops, in
    the model dtype (Llama RMSNorm: fp32 statistics, cast back, then the weight; Gemma RMSNorm:
    fp32 throughout, times ``1 + weight``, cast back once)."""
    x = hidden
    if head.norm == "rms":
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = head.norm_weight * (x.float() * torch.rsqrt(var + head.eps)).to(x.dtype)
    elif head.norm == "rms_offset":
        # GemmaRMSNorm.forward, op for op (bit-identical to it on every device).
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + head.eps)
        x = (out * (1.0 + head.norm_weight.float())).type_as(x)
    elif head.norm == "layer":
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), head.norm_weight, head.norm_bias, head.eps)
    if head.project_out is not None:
        x = x @ head.project_out.t()
    return x


def kernel_rows(hidden: torch.Tensor, head: ReadoutHead) -> tuple[torch.Tensor, int]:
    """(rows, norm code) to feed a fused kernel that applies the ``NORM_CODES`` norms itself.

    The caller's rows and the head's norm code when the kernel can apply the norm (``rms``,
    ``layer``, ``none``) and there is no ``project_out``; otherwise the (R, d_out) rows of
    ``decode_rows`` (norm + projection with Hugging Face's ops, in torch on R rows) and code 0.
    The caller keeps checking its own ``hidden`` for inf/NaN rows.
    """
    if head.project_out is None and head.norm in NORM_CODES:
        return hidden, NORM_CODES[head.norm]
    return decode_rows(hidden, head), 0


def empty_signals(device: torch.device, with_score: bool) -> ExitSignals:
    """The signals of zero rows (every backend returns these for R = 0)."""
    empty = torch.empty(0, dtype=torch.float32, device=device)
    return ExitSignals(
        top_prob=empty,
        gap=empty.clone(),
        argmax=torch.empty(0, dtype=torch.int64, device=device),
        score=empty.clone() if with_score else None,
    )
