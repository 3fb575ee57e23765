"""The exit head split over vocabulary shards: per-shard partials and their merge (tensor parallel).

Under tensor parallelism the LM head is vocab-sharded: rank r holds the rows [start_r, end_r) of W.
``exit_head_partials(hidden, shard_head, start_r)`` computes, per row, the exit head's softmax
statistics over the shard's candidates (the shard is a ``ReadoutHead`` whose weight is those rows),
and ``merge_exit_partials`` combines the statistics of every shard into the ``ExitSignals`` that
``exit_head`` gives on the whole head. With z_c the candidate logits (soft-capped, then biased,
exactly as ``exit_head`` computes them) and C_r the candidates of shard r:

    m_r = max_{c in C_r} z_c            s_r = sum_{c in C_r} exp(z_c - m_r)
    i_r = lowest global id c with z_c = m_r                (top1_id)
    t_r = max_{c in C_r, c != i_r} z_c, j_r its lowest id  (top2_logit, top2_id; -inf / -1 if none)

    M = max_r m_r      S = sum_r s_r exp(m_r - M)      I = lowest i_r among the shards with m_r = M
    T = max(t_w, max_{r != w} m_r) where w is the shard with (m_w, i_w) = (M, I)
    top_prob = 1 / S   gap = top_prob - exp(T - M) / S   argmax = I   score = stop_rule(top_prob, gap)

Ties are broken by the global id, never by the order of the shards in the list, so the merge is the
same function of the set of partials on every rank; an exact tie of the maximum across two shards
gives T = M and gap 0, as on the whole head. The merge is associative: ``merge_partials`` folds any
group of partials into one partial (a two-level merge, or the Triton kernel's per-split partials).

Tensor-parallel contract (the all-gather). Every rank computes the partials of the same (R, d)
hidden states over its own shard, all-gathers them into one (S, R) bundle (``ExitPartials.stack``
of the S ranks' partials, rank order irrelevant), and calls ``merge_exit_partials`` on it: every
rank evaluates the same function of the same bundle with the same ops, so every rank takes the same
exit decision (same argmax, same score, bit for bit on ranks of one kind of device). What moves is
the five (R,) fields: fp32 max_logit, fp32 sum_exp, int64 top1_id, fp32 top2_logit, int64 top2_id,
i.e. 28 bytes per row per rank (20 with ids narrowed to int32 on the wire), against 2·V_r bytes per
row for the bf16 logits themselves. A probe's or a vocabulary subset's head is small: replicate it
(one shard, ``vocab_start = 0``) rather than shard it.

Rows whose hidden state holds inf or NaN: every partial field is NaN and both ids -1, and the merge
gives NaN top_prob / gap / score and argmax -1 (``ExitSignals``' rule). A shard whose candidate logits
are all -inf (a logit bias of -inf) has max_logit -inf, sum_exp 0, top1_id its lowest id; if every
shard is so, top_prob / gap / score are NaN and argmax is the lowest id, as ``exit_head`` gives.

Backends of ``exit_head_partials`` (``backend.exit_head_backend``, as ``exit_head``; the (R, V)
logits are never materialised except by the reference): CPU tensors -> ``adainfer::exit_head_cpu_stats``
(the native op's raw statistics, of which ``exit_head_cpu`` is the final loop) or the torch fallback
(``exit_head._stats_torch``); CUDA tensors -> the Triton split-V pass (``_exit_head_partials_kernel``,
the body and numerics of ``exit_head``'s first pass plus the second's position) whose (n_splits, R)
partials ``merge_partials`` folds to one per row; ``ADAINFER_BACKEND=reference`` -> statistics of
``reference.head_logits_ref``'s materialised fp32 logits.

Accuracy: a shard's logits are computed as the whole head's are, so the merged signals differ from
``exit_head`` on the whole head only by the order of the fp32 sum-exp and its rescaling: measured at
most 5 x 2^-24 (3e-7) on top_prob and gap, for fp32, bf16 and fp16 weights alike (V up to 32000,
1-7 shards; tests/kernels/test_exit_partials.py). One shard merges to the whole head's signals bit
for bit on the CPU paths. Argmax is exact, ties included.

Both functions are registered ops, ``torch.ops.adainfer.exit_head_partials`` and
``torch.ops.adainfer.merge_exit_partials`` (flattened tensors and scalars; the functions here build
them), with fake implementations so that they trace under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adainfer_kernels.backend import exit_head_backend
from adainfer_kernels.exit_head import cpu_stats
from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule, check_exit_head_inputs
from adainfer_kernels.reference import head_logits_ref

__all__ = ["ExitPartials", "exit_head_partials", "merge_exit_partials", "merge_partials"]

_NEG_INF = float("-inf")
_NO_ID = torch.iinfo(torch.int64).max  # larger than every id: the identity of "lowest id"


@dataclass(frozen=True)
class ExitPartials:
    """The exit head's statistics over one shard's candidates, per row; each field (R,), or (S, R)
    for a stacked bundle of S shards (``stack``).

    Attributes:
        max_logit: fp32 largest candidate logit (after soft-cap and logit bias); -inf when every
            candidate logit is -inf; NaN for rows holding inf/NaN.
        sum_exp: fp32 sum of exp(z - max_logit) over the candidates (0 when max_logit is -inf).
        top1_id: int64 global vocabulary id of the max (with a vocabulary subset: the subset's id,
            the earlier subset entry on ties), the lowest on ties; -1 for rows holding inf/NaN.
        top2_logit: fp32 second largest candidate logit (an exact tie of the max counts twice);
            -inf when the shard has one candidate.
        top2_id: int64 global id of the second (lowest on ties); -1 when top2_logit is -inf or the
            row holds inf/NaN.
    """

    max_logit: torch.Tensor
    sum_exp: torch.Tensor
    top1_id: torch.Tensor
    top2_logit: torch.Tensor
    top2_id: torch.Tensor

    def __len__(self) -> int:
        """R, the number of rows."""
        return self.max_logit.shape[-1]

    def fields(self) -> tuple[torch.Tensor, ...]:
        """(max_logit, sum_exp, top1_id, top2_logit, top2_id)."""
        return self.max_logit, self.sum_exp, self.top1_id, self.top2_logit, self.top2_id

    @classmethod
    def stack(cls, parts: Sequence[ExitPartials]) -> ExitPartials:
        """One (S, R) bundle from S shards' (R,) partials: what an all-gather moves (28 bytes per row
        per rank: three fp32 and two int64 fields)."""
        parts = list(parts)
        if not parts or not all(isinstance(p, ExitPartials) for p in parts):
            raise TypeError("stack takes a non-empty sequence of ExitPartials (one per shard)")
        for p in parts:
            _check_fields(p, ndim=1)
        if len({len(p) for p in parts}) != 1:
            raise ValueError(f"every shard's partials must have the same rows, got {[len(p) for p in parts]}")
        return cls(*(torch.stack(f) for f in zip(*(p.fields() for p in parts), strict=True)))

    def unstack(self) -> list[ExitPartials]:
        """The S shards' (R,) partials of an (S, R) bundle (views of it)."""
        _check_fields(self, ndim=2)
        return [ExitPartials(*(f[s] for f in self.fields())) for s in range(self.max_logit.shape[0])]


_DTYPES = (torch.float32, torch.float32, torch.int64, torch.float32, torch.int64)
_NAMES = ("max_logit", "sum_exp", "top1_id", "top2_logit", "top2_id")


def _check_fields(p: ExitPartials, ndim: int) -> None:
    shape = p.max_logit.shape if isinstance(p.max_logit, torch.Tensor) else None
    for name, dt, t in zip(_NAMES, _DTYPES, p.fields(), strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != dt or t.shape != shape:
            desc = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            want = "(R,)" if ndim == 1 else "(S, R)"
            raise ValueError(f"ExitPartials.{name} must be a {dt} tensor of shape {want} like max_logit, got {desc}")
        if t.device != p.max_logit.device:
            raise ValueError(f"ExitPartials.{name} is on {t.device} but max_logit is on {p.max_logit.device}")


# ---- per-shard partials ----


def exit_head_partials(hidden: torch.Tensor, head: ReadoutHead, vocab_start: int = 0) -> ExitPartials:
    """The exit head's statistics over the candidates of ``head``, with global ids.

    Args:
        hidden: (R, d) bf16/fp16/fp32 hidden states (as ``exit_head``); R may be 0.
        head: this rank's shard of the decode path: a ``ReadoutHead`` whose weight is the shard's
            (V_r, d) rows of the LM head (norm, ``project_out`` and soft-cap as the whole head's).
            With ``vocab_subset`` the candidates are the subset and the ids are the subset's ids.
        vocab_start: global id of the shard's first row (start_r); must be 0 with a vocabulary subset.

    Returns:
        ``ExitPartials`` with (R,) fields (ids in the global vocabulary). Computed under
        ``torch.inference_mode()``, never holding (R, V_r) logits (except the reference backend).

    Raises:
        TypeError, ValueError, IndexError, RuntimeError: bad input (``check_exit_head_inputs``, and
            ``vocab_start`` not an int >= 0, or not 0 with a subset), before any work is done.
    """
    check_exit_head_inputs(hidden, head)
    _check_vocab_start(head, vocab_start)
    cap = float(head.logit_softcap) if head.logit_softcap is not None else None
    with torch.inference_mode():
        out = torch.ops.adainfer.exit_head_partials(
            hidden,
            head.weight,
            head.norm,
            head.norm_weight,
            head.norm_bias,
            float(head.eps),
            head.project_out,
            head.vocab_subset,
            head.logit_bias,
            cap,
            int(vocab_start),
        )
    return ExitPartials(*out)


def _check_vocab_start(head: ReadoutHead, vocab_start: object) -> None:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (the shard's first global row id), got {vocab_start!r}")
    if head.vocab_subset is not None and vocab_start != 0:
        raise ValueError(
            "vocab_start must be 0 with a vocab_subset: the subset's ids are already global vocabulary ids "
            "(replicate a subset head instead of sharding it)"
        )


def _partials(
    hidden: torch.Tensor,
    head: ReadoutHead,
    vocab_start: int,
    backend: str | None = None,
    impl: str = "auto",
    variant: str | None = None,
) -> ExitPartials:
    """The backends of ``exit_head_partials`` (inputs checked). Tests force one: ``backend``
    (``"triton"``, ``"cpu"``, ``"reference"``; None: ``backend.exit_head_backend``), the CPU path's
    ``impl`` (``"auto"``, ``"native"``, ``"torch"``) and the Triton ``variant``."""
    n_rows = hidden.shape[0]
    if n_rows == 0:
        f = lambda dt: torch.empty(0, dtype=dt, device=hidden.device)
        return ExitPartials(*(f(dt) for dt in _DTYPES))
    choice = backend or exit_head_backend(hidden.device).name
    if choice == "triton":
        from adainfer_kernels.exit_head_triton import exit_head_triton_partials

        m, s, i, t, j = exit_head_triton_partials(hidden, head, variant=variant, check=False)
        split = merge_partials(ExitPartials(m, s, i.to(torch.int64), t, j.to(torch.int64)))
        stats = split.fields()
    elif choice == "cpu":
        stats = cpu_stats(hidden, head, impl)
    else:
        stats = _stats_reference(hidden, head)
    return _with_ids(*stats, hidden, head, vocab_start)


def _stats_reference(hidden: torch.Tensor, head: ReadoutHead) -> tuple[torch.Tensor, ...]:
    """(max, sum, pos, second, second_pos) of ``reference.head_logits_ref``'s (R, K) fp32 logits."""
    z = head_logits_ref(hidden, head, upcast=True)
    pos = torch.argmax(z, dim=1)  # the first maximal position
    big_m = z.gather(1, pos[:, None]).squeeze(1)
    safe = torch.where(big_m > _NEG_INF, big_m, 0.0)
    big_s = torch.exp(z - safe[:, None]).sum(dim=1)
    if z.shape[1] > 1:
        rest = z.scatter(1, pos[:, None], _NEG_INF)
        second_pos = torch.argmax(rest, dim=1)
        second = rest.gather(1, second_pos[:, None]).squeeze(1)
    else:
        second, second_pos = torch.full_like(big_m, _NEG_INF), torch.full_like(pos, -1)
    return big_m, big_s, pos, second, second_pos


def _with_ids(
    big_m: torch.Tensor,
    big_s: torch.Tensor,
    pos: torch.Tensor,
    second: torch.Tensor,
    second_pos: torch.Tensor,
    hidden: torch.Tensor,
    head: ReadoutHead,
    vocab_start: int,
) -> ExitPartials:
    """Candidate positions -> global ids, and the NaN / -1 rules for rows holding inf/NaN."""
    bad = ~torch.isfinite(hidden).all(dim=1)
    nan = torch.full_like(big_m, float("nan"))
    second_pos = torch.where(bad | ~(second > _NEG_INF), -1, second_pos)
    pos = torch.where(bad, -1, pos)

    def ids(p: torch.Tensor) -> torch.Tensor:
        if head.vocab_subset is None:
            return torch.where(p < 0, -1, p + vocab_start)
        return torch.where(p < 0, -1, head.vocab_subset.to(torch.int64)[p.clamp(min=0)])

    return ExitPartials(
        max_logit=torch.where(bad, nan, big_m).float(),
        sum_exp=torch.where(bad, nan, big_s).float(),
        top1_id=ids(pos.to(torch.int64)),
        top2_logit=torch.where(bad, nan, second).float(),
        top2_id=ids(second_pos.to(torch.int64)),
    )


# ---- the merge ----


def merge_partials(stacked: ExitPartials) -> ExitPartials:
    """Fold an (S, R) bundle of partials into the (R,) partials of the union of the S candidate sets.

    Associative, and independent of the order of the S entries: maxima, ids and the second are
    chosen by value and then lowest id. The sum-exp is sum_s s_s exp(m_s - M) in fp32.
    """
    _check_fields(stacked, ndim=2)
    if stacked.max_logit.shape[0] == 0:
        raise ValueError("merge_partials needs the partials of at least one shard (S >= 1)")
    m, s, i, t, j = stacked.fields()
    bad = (i < 0).any(dim=0)  # a row holding inf/NaN: every shard says -1
    m = torch.where(bad, _NEG_INF, m)  # keep NaN out of the max
    big_m = m.max(dim=0).values
    big_i = torch.where(m == big_m, i, _NO_ID).min(dim=0).values
    winner = (m == big_m) & (i == big_i)  # one shard per row: ids are distinct across shards
    safe = torch.where(big_m > _NEG_INF, big_m, 0.0)
    big_s = (torch.where(bad, 0.0, s) * torch.exp(m - safe)).sum(dim=0)
    # The second: the winner's own second, or another shard's max (on equal values the lowest id).
    cand_v = torch.where(winner, torch.where(bad, _NEG_INF, t), m)
    cand_i = torch.where(winner, j, i)
    big_t = cand_v.max(dim=0).values
    big_j = torch.where(cand_v == big_t, cand_i, _NO_ID).min(dim=0).values
    big_j = torch.where(big_t > _NEG_INF, big_j, -1)
    nan = torch.full_like(big_m, float("nan"))
    return ExitPartials(
        max_logit=torch.where(bad, nan, big_m),
        sum_exp=torch.where(bad, nan, big_s),
        top1_id=torch.where(bad, -1, big_i),
        top2_logit=torch.where(bad, nan, big_t),
        top2_id=torch.where(bad, -1, big_j),
    )


def merge_exit_partials(parts: Sequence[ExitPartials] | ExitPartials, stop_rule: StopRule | None = None) -> ExitSignals:
    """The exit signals of the union of the shards, from their partials.

    Args:
        parts: the S shards' (R,) partials in any order, or their stacked (S, R) bundle (an
            all-gather's result); an (R,) ``ExitPartials`` counts as one shard.
        stop_rule: optional ``StopRule``; its value is ``score``.

    Returns:
        ``ExitSignals`` with (R,) fields: ``top_prob`` = 1 / S, ``gap`` = top_prob - exp(T - M) / S,
        ``argmax`` = I (the lowest global id among equal maxima), ``score``; NaN signals and argmax
        -1 for rows holding inf/NaN, NaN signals when every candidate logit is -inf.
    """
    if isinstance(parts, ExitPartials):
        stacked = ExitPartials(*(f.unsqueeze(0) for f in parts.fields())) if parts.max_logit.dim() == 1 else parts
    else:
        stacked = ExitPartials.stack(parts)
    _check_fields(stacked, ndim=2)
    if stop_rule is not None and not isinstance(stop_rule, StopRule):
        raise TypeError(f"stop_rule must be a StopRule or None, got {type(stop_rule).__name__}")
    rule = stop_rule if stop_rule is not None else StopRule(0.0, 0.0, 0.0)
    top, gap, argmax, score = torch.ops.adainfer.merge_exit_partials(
        *stacked.fields(), float(rule.w_top_prob), float(rule.w_gap), float(rule.offset)
    )
    return ExitSignals(top_prob=top, gap=gap, argmax=argmax, score=score if stop_rule is not None else None)


def _signals(stacked: ExitPartials, rule: StopRule) -> tuple[torch.Tensor, ...]:
    """(top_prob, gap, argmax, score) of an (S, R) bundle: the final loop of ``exit_head_cpu`` on
    the merged statistics."""
    p = merge_partials(stacked)
    top = 1.0 / p.sum_exp
    gap = top - torch.exp(p.top2_logit - p.max_logit) / p.sum_exp
    undefined = (p.top1_id < 0) | ~(p.max_logit > _NEG_INF)
    nan = torch.full_like(top, float("nan"))
    top = torch.where(undefined, nan, top)
    gap = torch.where(undefined, nan, gap)
    return top, gap, p.top1_id, rule(top, gap)


# ---- registered ops (flattened tensors and scalars; the functions above build them) ----

_PARTIALS_OUT = (torch.float32, torch.float32, torch.int64, torch.float32, torch.int64)


@torch.library.custom_op("adainfer::exit_head_partials", mutates_args=(), device_types=("cpu", "cuda"))
def _exit_head_partials_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    norm: str,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    project_out: torch.Tensor | None,
    vocab_subset: torch.Tensor | None,
    logit_bias: torch.Tensor | None,
    logit_softcap: float | None,
    vocab_start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max_logit, sum_exp, top1_id, top2_logit, top2_id), each (R,): ``exit_head_partials`` of the
    ``ReadoutHead`` these tensors make (CPU: the native op or torch fallback; CUDA: Triton)."""
    head = ReadoutHead(
        weight=weight,
        norm=norm,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        eps=eps,
        project_out=project_out,
        vocab_subset=vocab_subset,
        logit_bias=logit_bias,
        logit_softcap=logit_softcap,
    )
    check_exit_head_inputs(hidden, head)
    _check_vocab_start(head, vocab_start)
    return _partials(hidden, head, vocab_start).fields()


@_exit_head_partials_op.register_fake
def _(hidden, weight, norm, norm_weight, norm_bias, eps, project_out, vocab_subset, logit_bias, softcap, start):
    return tuple(hidden.new_empty((hidden.shape[0],), dtype=dt) for dt in _PARTIALS_OUT)


@torch.library.custom_op("adainfer::merge_exit_partials", mutates_args=())
def _merge_exit_partials_op(
    max_logit: torch.Tensor,
    sum_exp: torch.Tensor,
    top1_id: torch.Tensor,
    top2_logit: torch.Tensor,
    top2_id: torch.Tensor,
    w_top_prob: float,
    w_gap: float,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_prob, gap, argmax, score), each (R,), of an (S, R) bundle of partials; the score is
    ``w_top_prob * top_prob + w_gap * gap + offset``."""
    stacked = ExitPartials(max_logit, sum_exp, top1_id, top2_logit, top2_id)
    return _signals(stacked, StopRule(w_top_prob, w_gap, offset))


@_merge_exit_partials_op.register_fake
def _(max_logit, sum_exp, top1_id, top2_logit, top2_id, w_top_prob, w_gap, offset):
    torch._check(max_logit.dim() == 2, lambda: "merge_exit_partials takes (S, R) partials")
    r = max_logit.shape[1]
    f = lambda dt: max_logit.new_empty((r,), dtype=dt)
    return f(torch.float32), f(torch.float32), f(torch.int64), f(torch.float32)
