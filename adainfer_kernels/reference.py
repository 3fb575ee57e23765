"""Plain-PyTorch specifications of every op: readable, obviously correct, slow.

Tests compare every backend against these, and the benchmarks use them as the baseline. They
materialise whatever is convenient (the [R, V] logits included); the fused paths must not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule


def apply_norm_ref(hidden: torch.Tensor, head: ReadoutHead, upcast: bool = False) -> torch.Tensor:
    """The model's final norm (+ ``project_out``) exactly as Hugging Face computes it.

    Llama's RMSNorm: statistics in fp32, the normalised value cast back to the input dtype, then
    multiplied by the weight. Gemma's RMSNorm (``rms_offset``): normalised and multiplied by
    ``1 + weight`` in fp32 (fp64 for fp64 inputs), one cast back to the input dtype at the end.
    OPT's LayerNorm: ``F.layer_norm`` with weight and bias.
    With ``upcast=True`` every step runs in fp32 (the error-free reference of FlashAttention's rule).
    """
    x = hidden.float() if upcast else hidden
    if head.norm == "rms":
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(var + head.eps)).to(x.dtype)
        w = head.norm_weight.float() if upcast else head.norm_weight
        x = w * normed
    elif head.norm == "rms_offset":
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for an fp64 evaluation
        xa = x.to(acc)
        scale = 1.0 + head.norm_weight.to(acc)
        x = (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + head.eps) * scale).to(x.dtype)
    elif head.norm == "layer":
        w = head.norm_weight.float() if upcast else head.norm_weight
        b = head.norm_bias
        if b is not None and upcast:
            b = b.float()
        x = F.layer_norm(x, (x.shape[-1],), w, b, head.eps)
    if head.project_out is not None:
        p = head.project_out.float() if upcast else head.project_out
        x = x @ p.t()
    return x


def head_logits_ref(hidden: torch.Tensor, head: ReadoutHead, upcast: bool = False) -> torch.Tensor:
    """(R, K) fp32 logits over the candidates (subset rows of W, soft-capped, bias added), materialised.

    The soft-cap runs where Gemma2's forward runs it, on the LM head's output in its dtype
    (the model dtype, fp32 with ``upcast``): ``cap * tanh(z / cap)``, then the logit bias.
    """
    x = apply_norm_ref(hidden, head, upcast)
    w = head.weight if head.vocab_subset is None else head.weight[head.vocab_subset]
    if upcast:
        w = w.float()
    z = x @ w.t()
    if head.logit_softcap is not None:
        z = torch.tanh(z / head.logit_softcap) * head.logit_softcap
    logits = z.float()
    if head.logit_bias is not None:
        logits = logits + head.logit_bias.float()
    return logits


def signals_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top_prob, gap, position) of each row of (R, K) fp32 logits; position is in [0, K).

    Ties: ``torch.argmax`` returns the first maximal position, i.e. the lower position wins, and
    the second probability is the max over the other positions, so an exact tie gives gap 0.
    With K == 1 the second probability is 0 (gap == top_prob).
    """
    probs = torch.softmax(logits, dim=-1)
    pos = torch.argmax(logits, dim=-1)
    top_prob = probs.gather(1, pos[:, None]).squeeze(1)
    if logits.shape[1] > 1:
        others = probs.scatter(1, pos[:, None], float("-inf"))
        second = others.max(dim=1).values
    else:
        second = torch.zeros_like(top_prob)
    gap = top_prob - second
    return top_prob, gap, pos


def exit_head_ref(
    hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None = None, upcast: bool = True
) -> ExitSignals:
    """Reference exit head: norm -> logits (materialised) -> softmax -> top-2 -> score.

    Args:
        hidden: (R, d) last-token hidden states, bf16/fp16/fp32.
        head: the model's decode path (see ``ReadoutHead``).
        stop_rule: optional ``StopRule`` over (top_prob, gap); its value is ``score``.
        upcast: compute the norm and the matmul in fp32 (True, the spec) or in the input dtype as
            Hugging Face does (False; used to measure PyTorch's own low-precision error).

    Returns:
        ExitSignals with (R,) fields; non-finite rows get NaN signals and argmax -1.
    """
    logits = head_logits_ref(hidden, head, upcast)
    top_prob, gap, pos = signals_from_logits(logits)
    argmax = pos if head.vocab_subset is None else head.vocab_subset.to(pos.device)[pos]
    bad = ~torch.isfinite(hidden).all(dim=-1)
    if bool(bad.any()):
        nan = torch.tensor(float("nan"), device=top_prob.device)
        top_prob = torch.where(bad, nan, top_prob)
        gap = torch.where(bad, nan, gap)
        argmax = torch.where(bad, torch.full_like(argmax, -1), argmax)
    value = stop_rule(top_prob, gap) if stop_rule is not None else None
    return ExitSignals(top_prob=top_prob, gap=gap, argmax=argmax.to(torch.int64), score=value)


def compact_rows_ref(
    keep: torch.Tensor, row_map: torch.Tensor, tensors: Sequence[torch.Tensor | None]
) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
    """Reference compaction with boolean indexing, one tensor at a time.

    Returns (compacted tensors, row_map of the rows kept, original rows that finished). Tensors
    whose dim 0 equals the number of active rows are compacted; others with dim 0 == 1 are
    broadcasts and pass through; None passes through.
    """
    active = keep.shape[0]
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None or (t.shape[0] == 1 and active != 1):
            out.append(t)
        else:
            out.append(t[keep])
    return out, row_map[keep], row_map[~keep]


def scatter_rows_ref(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Reference scatter: ``out[rows] = values`` in place (rows distinct); returns out."""
    out[rows] = values
    return out


def merge_rows_ref(
    active_values: torch.Tensor,
    active_rows: torch.Tensor,
    fill_values: torch.Tensor,
    fill_rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Reference merge: a (batch_size, ...) tensor with ``out[active_rows] = active_values`` and
    ``out[fill_rows] = fill_values`` (the rows together a permutation of range(batch_size))."""
    out = active_values.new_empty((batch_size, *active_values.shape[1:]))
    out[active_rows] = active_values
    out[fill_rows] = fill_values
    return out
