"""Per-shard exit partials and their merge (tensor parallel) against the whole-vocabulary exit head.

The invariant: ``merge_exit_partials([exit_head_partials(h, shard_r, start_r) for r])`` equals
``exit_head(h, whole_head)`` on every backend: argmax exactly (exact ties across shard boundaries
included), top_prob / gap / score within MERGE_TOL (below), and within the 2x-PyTorch rule of
exit_head_helpers against ``reference.exit_head_ref``.

Tolerances of the merge against the whole head on the same backend (absolute; top_prob and gap live
in [0, 1]). A shard's logits are computed as the whole head's are (same kernel, same fp32
accumulation of exact products, for fp32, bf16 and fp16 weights alike), so on the fused backends
(native CPU op, torch fallback, Triton) the only difference is the order in which the fp32 sum-exp
is accumulated and rescaled. Measured (V up to 32000, 1-7 shards, with and without soft-cap): at
most 5 x 2^-24 (3.0e-7) for fp32, bf16 and fp16 weights alike. MERGE_TOL["fused"] = 8 x 2^-24.
The reference backend's whole-head signals come from ``torch.softmax`` of the (R, V) logits, not from
1 / S: its own fp32 sum over V terms differs from the merged one by up to 59 x 2^-24 (3.5e-6) at
V = 32000, again for every dtype: MERGE_TOL["reference"] = 64 x 2^-24. The score adds
|w_top_prob| + |w_gap| times the bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random

import pytest
import torch
from exit_head_helpers import (
    DTYPES,
    STOP_RULE,
    check_signals,
    make_head,
    make_hidden,
    shard_bounds,
    shard_head,
)

from adainfer_kernels import ExitPartials, exit_head, exit_head_partials, merge_exit_partials
from adainfer_kernels.exit_head import _exit_head_cpu, _native_supports
from adainfer_kernels.exit_head_triton import exit_head_triton
from adainfer_kernels.exit_partials import _partials, merge_partials
from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule
from adainfer_kernels.reference import exit_head_ref

MERGE_TOL = {"fused": 8 * 2.0**-24, "reference": 64 * 2.0**-24}
SHARD_COUNTS = (1, 2, 3, 4, 7)
HAS_NATIVE = {dt: _native_supports(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
BACKENDS = ["native", "torch", "reference", "splitv", "rowtile"]


def _skip_unavailable(backend: str, dtype: torch.dtype) -> None:
    if backend == "native" and not HAS_NATIVE[dtype]:
        pytest.skip(f"the native CPU exit head cannot run {dtype} on this CPU")


def whole_signals(backend: str, hidden: torch.Tensor, head: ReadoutHead, rule: StopRule | None) -> ExitSignals:
    """``exit_head`` on the whole head, on one backend."""
    if backend in ("splitv", "rowtile"):
        return exit_head_triton(hidden, head, rule, variant=backend)
    if backend == "reference":
        return exit_head_ref(hidden, head, rule)
    with torch.inference_mode():
        return _exit_head_cpu(hidden, head, rule, impl=backend)


def partials(backend: str, hidden: torch.Tensor, head: ReadoutHead, start: int = 0) -> ExitPartials:
    """``exit_head_partials`` of one shard, on one backend."""
    with torch.inference_mode():
        if backend in ("splitv", "rowtile"):
            return _partials(hidden, head, start, backend="triton", variant=backend)
        if backend == "reference":
            return _partials(hidden, head, start, backend="reference")
        return _partials(hidden, head, start, backend="cpu", impl=backend)


def sharded(backend: str, hidden: torch.Tensor, head: ReadoutHead, n_shards: int) -> list[ExitPartials]:
    b = shard_bounds(head.vocab_size, n_shards)
    return [partials(backend, hidden, shard_head(head, lo, hi), lo) for lo, hi in itertools.pairwise(b)]


def _tol(backend: str) -> float:
    return MERGE_TOL["reference" if backend == "reference" else "fused"]


def assert_same_signals(
    got: ExitSignals, want: ExitSignals, rule: StopRule | None, what: str = "", tol: float = MERGE_TOL["fused"]
) -> None:
    """argmax exactly; NaN rows identical; floats within ``tol`` (score: scaled by the rule)."""
    assert torch.equal(got.argmax, want.argmax), (
        f"{what}: argmax differs on rows {(got.argmax != want.argmax).nonzero().flatten()[:8].tolist()}: "
        f"got {got.argmax.tolist()[:8]} want {want.argmax.tolist()[:8]}"
    )
    scale = abs(rule.w_top_prob) + abs(rule.w_gap) if rule is not None else 0.0
    for name, bound in (("top_prob", tol), ("gap", tol), ("score", scale * tol + 2.0**-22)):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what} {name}: NaN rows differ: {a} vs {b}"
        ok = ~torch.isnan(b)
        err = (a[ok].double() - b[ok].double()).abs()
        worst = float(err.max()) if err.numel() else 0.0
        assert worst <= bound, (
            f"{what} {name}: max err {worst:.3e} (mean {float(err.mean()):.3e}) > {bound:.3e}; "
            f"worst rows {torch.argsort(err, descending=True)[:5].tolist()}"
        )


# ---- the invariant on random heads ----


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_shards_equal_the_whole_head(backend, dt):
    dtype = DTYPES[dt]
    _skip_unavailable(backend, dtype)
    triton = backend in ("splitv", "rowtile")
    # Soft-capped for half of the cases; the interpreter gets small shapes (V = 1000, 3 or 6 rows).
    softcap = 30.0 if dt != "fp16" else None
    n_vocab = 1000 if triton else 3001
    n_rows = {"splitv": 3, "rowtile": 6}.get(backend, 17)
    head = make_head(64, n_vocab, dtype, "rms" if dt != "fp16" else "layer", softcap=softcap, seed=11)
    hidden = make_hidden(n_rows, head, dtype, seed=12)
    whole = whole_signals(backend, hidden, head, STOP_RULE)
    for n in SHARD_COUNTS:
        parts = sharded(backend, hidden, head, n)
        got = merge_exit_partials(parts, STOP_RULE)
        assert_same_signals(got, whole, STOP_RULE, f"{backend} {dt} {n} shards", _tol(backend))
        if n in (1, 7):
            check_signals(got, hidden, head, STOP_RULE)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_one_shard_merges_to_exit_head_bit_for_bit(backend):
    """The CPU paths' exit_head is the merge's final loop over the same statistics."""
    head = make_head(96, 2000, torch.bfloat16, "rms", seed=13)
    hidden = make_hidden(9, head, torch.bfloat16)
    _skip_unavailable(backend, torch.bfloat16)
    got = merge_exit_partials([partials(backend, hidden, head)], STOP_RULE)
    want = whole_signals(backend, hidden, head, STOP_RULE)
    for name in ("top_prob", "gap", "argmax", "score"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_public_functions_pick_the_backend_and_match_exit_head():
    head = make_head(64, 1500, torch.float32, "layer", seed=14)
    hidden = make_hidden(5, head, torch.float32)
    b = shard_bounds(head.vocab_size, 3)
    parts = [exit_head_partials(hidden, shard_head(head, lo, hi), lo) for lo, hi in itertools.pairwise(b)]
    assert all(p.max_logit.dtype == torch.float32 and p.top1_id.dtype == torch.int64 for p in parts)
    assert_same_signals(merge_exit_partials(parts, STOP_RULE), exit_head(hidden, head, STOP_RULE), STOP_RULE)
    assert merge_exit_partials(parts).score is None


def test_reference_backend_through_the_environment(monkeypatch):
    monkeypatch.setenv("ADAINFER_BACKEND", "reference")
    head = make_head(64, 800, torch.float32, "rms", seed=15)
    hidden = make_hidden(4, head, torch.float32)
    b = shard_bounds(head.vocab_size, 4)
    parts = [exit_head_partials(hidden, shard_head(head, lo, hi), lo) for lo, hi in itertools.pairwise(b)]
    want = exit_head(hidden, head, STOP_RULE)
    assert_same_signals(merge_exit_partials(parts, STOP_RULE), want, STOP_RULE, tol=MERGE_TOL["reference"])
    assert os.environ["ADAINFER_BACKEND"] == "reference"


# ---- exact ties ----


def integer_head(n_vocab: int, d: int, dtype: torch.dtype, seed: int, softcap: float | None = None) -> ReadoutHead:
    """A head with small-integer weights: with integer hidden states every logit is an exact small
    integer on every backend and in any summation order, so ties are exact ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (n_vocab, d), generator=g).to(dtype)
    return ReadoutHead(weight=w, logit_softcap=softcap)


def tied_rows(head: ReadoutHead, bounds: list[int], seed: int) -> tuple[ReadoutHead, torch.Tensor, list[list[int]]]:
    """(head, hidden, tie groups): integer hidden states, plus one row per shard boundary b whose
    maximum is tied exactly across it: rows b-1 and b of W become the same vector v (two 5s; every
    other weight is in [-2, 2]) and the row's state is v, so those logits (50) are its maximum. A
    single-row shard extends the previous boundary's tie over it (three shards share the max).
    The groups list, per tie row, the ids holding its maximum."""
    g = torch.Generator().manual_seed(seed)
    d = head.hidden_size
    rows = [torch.randint(-1, 2, (d,), generator=g).float() for _ in range(4)]
    w = head.weight.clone()
    prev = None
    for k, b in enumerate(bounds[1:-1]):
        if prev is not None and b - 1 == prev:
            w[b] = w[b - 1]
        else:
            v = torch.zeros(d, dtype=w.dtype)
            v[k % d] = 5
            v[(k + 1) % d] = 5
            w[b - 1] = v
            w[b] = v
            rows.append(v.float())
        prev = b
    groups = [(w.float() == r).all(dim=1).nonzero().flatten().tolist() for r in rows[4:]]
    return dataclasses.replace(head, weight=w), torch.stack(rows).to(w.dtype), groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_exact_ties_across_shard_boundaries(backend, softcap):
    dtype = torch.float32 if backend != "native" or HAS_NATIVE[torch.float32] else torch.bfloat16
    _skip_unavailable(backend, dtype)
    n_vocab = 300
    for n in (2, 3, 7):
        bounds = shard_bounds(n_vocab, n)
        head, hidden, groups = tied_rows(integer_head(n_vocab, 16, dtype, seed=n, softcap=softcap), bounds, seed=n)
        want = exit_head_ref(hidden, head, STOP_RULE)
        parts = [partials(backend, hidden, shard_head(head, lo, hi), lo) for lo, hi in itertools.pairwise(bounds)]
        for order in (parts, parts[::-1], random.Random(n).sample(parts, len(parts))):
            got = merge_exit_partials(order, STOP_RULE)
            assert_same_signals(got, want, STOP_RULE, f"{backend} {n} shards", MERGE_TOL["reference"])
        # Each tie row's maximum is held by rows on both sides of a boundary: the lowest id wins, gap 0,
        # and the merged partials' second is the next id of the group.
        tie_rows = slice(4, None)
        assert all(len(grp) >= 2 for grp in groups)
        assert got.argmax[tie_rows].tolist() == [grp[0] for grp in groups]
        assert torch.all(got.gap[tie_rows] == 0)
        merged = merge_partials(ExitPartials.stack(parts))
        assert merged.top2_id[tie_rows].tolist() == [grp[1] for grp in groups]
        assert torch.equal(merged.top2_logit[tie_rows], merged.max_logit[tie_rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_partials_ids_match_the_reference_exactly(backend):
    """top1_id / top2_id (lowest id on ties) and the integer maxima, shard by shard. Logits are small
    integers (many exact ties of the max and of the second), and there are enough rows and
    candidates that the CPU paths merge several tasks / chunks and Triton several tiles per split."""
    dtype = torch.bfloat16
    _skip_unavailable(backend, dtype)
    triton = backend in ("splitv", "rowtile")
    n_vocab, n_rows = (1500, 3 if backend == "splitv" else 70) if triton else (2500, 300)
    head = integer_head(n_vocab, 8, dtype, seed=3)
    hidden = torch.randint(0, 2, (n_rows, 8), generator=torch.Generator().manual_seed(4)).to(dtype)
    for lo, hi in ((0, n_vocab), (0, 1), (5, 333), (333, n_vocab)):
        got = partials(backend, hidden, shard_head(head, lo, hi), lo)
        want = partials("reference", hidden, shard_head(head, lo, hi), lo)
        for name in ("max_logit", "top1_id", "top2_logit", "top2_id"):
            a, b = getattr(got, name), getattr(want, name)
            bad = (a != b).nonzero().flatten()[:5].tolist()
            assert not bad, (
                f"{name} of shard [{lo}, {hi}) differs on rows {bad}: {a[bad].tolist()} vs {b[bad].tolist()}"
            )
        torch.testing.assert_close(got.sum_exp, want.sum_exp, rtol=4e-7, atol=0)
        if hi - lo == 1:
            assert torch.all(got.top2_id == -1) and torch.all(got.top2_logit == float("-inf"))


# ---- subsets with a logit bias, soft-cap, non-finite rows, empty batches ----


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_subset_with_logit_bias_and_softcap(backend):
    """A subset head split into pieces of its (sorted) subset: ids are global already, start 0."""
    dtype = torch.float16
    _skip_unavailable(backend, dtype)
    head = make_head(64, 2000, dtype, "rms", subset=301, bias=True, softcap=20.0, seed=16)
    ids = head.vocab_subset.sort()
    head = dataclasses.replace(head, vocab_subset=ids.values, logit_bias=head.logit_bias[ids.indices])
    hidden = make_hidden(3 if backend == "splitv" else 7, head, dtype)
    whole = whole_signals(backend, hidden, head, STOP_RULE)
    for n in (1, 4):
        b = shard_bounds(301, n)
        pieces = [
            dataclasses.replace(head, vocab_subset=head.vocab_subset[lo:hi], logit_bias=head.logit_bias[lo:hi])
            for lo, hi in itertools.pairwise(b)
        ]
        got = merge_exit_partials([partials(backend, hidden, p) for p in pieces], STOP_RULE)
        assert_same_signals(got, whole, STOP_RULE, f"{backend} subset {n} pieces", _tol(backend))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_and_all_masked_candidates(backend):
    dtype = torch.float32 if backend != "native" or HAS_NATIVE[torch.float32] else torch.bfloat16
    _skip_unavailable(backend, dtype)
    head = make_head(64, 600, dtype, "layer", seed=17)
    hidden = make_hidden(6, head, dtype)
    hidden[1, 3] = float("nan")
    hidden[4, 0] = float("inf")
    whole = whole_signals(backend, hidden, head, STOP_RULE)
    parts = sharded(backend, hidden, head, 3)
    for p in parts:
        assert p.top1_id[[1, 4]].tolist() == [-1, -1] and p.top2_id[[1, 4]].tolist() == [-1, -1]
        assert torch.isnan(p.max_logit[[1, 4]]).all() and torch.isnan(p.sum_exp[[1, 4]]).all()
    got = merge_exit_partials(parts, STOP_RULE)
    assert got.argmax[[1, 4]].tolist() == [-1, -1] and torch.isnan(got.score[[1, 4]]).all()
    assert_same_signals(got, whole, STOP_RULE, f"{backend} non-finite rows", _tol(backend))

    # A logit bias of -inf everywhere: no distribution (NaN), argmax the first candidate, like exit_head.
    sub = make_head(64, 600, dtype, "none", subset=40, bias=True, seed=18)
    sub = dataclasses.replace(sub, logit_bias=torch.full((40,), float("-inf")))
    hid = make_hidden(3 if backend == "splitv" else 5, sub, dtype)
    got = merge_exit_partials([partials(backend, hid, sub)], STOP_RULE)
    assert_same_signals(got, whole_signals(backend, hid, sub, STOP_RULE), STOP_RULE, f"{backend} all -inf")
    assert torch.isnan(got.top_prob).all() and torch.all(got.argmax == sub.vocab_subset[0])


def test_an_all_masked_shard_does_not_count():
    """One shard's candidates all at -inf (max -inf, sum 0) merged with a live shard."""
    head = make_head(64, 500, torch.float32, "none", seed=19)
    hidden = make_hidden(4, head, torch.float32)
    live = partials("torch", hidden, shard_head(head, 0, 300), 0)
    dead = ExitPartials(
        torch.full((4,), float("-inf")),
        torch.zeros(4),
        torch.full((4,), 300, dtype=torch.int64),
        torch.full((4,), float("-inf")),
        torch.full((4,), -1, dtype=torch.int64),
    )
    got = merge_exit_partials([dead, live], STOP_RULE)
    assert_same_signals(got, merge_exit_partials([live], STOP_RULE), STOP_RULE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    dtype = torch.bfloat16
    _skip_unavailable(backend, dtype)
    head = make_head(64, 300, dtype, "rms", seed=20)
    hidden = torch.empty(0, 64, dtype=dtype)
    parts = [
        partials(backend, hidden, shard_head(head, 0, 100), 0),
        partials(backend, hidden, shard_head(head, 100, 300), 100),
    ]
    assert all(len(p) == 0 for p in parts)
    got = merge_exit_partials(parts, STOP_RULE)
    assert got.top_prob.shape == (0,) and got.argmax.dtype == torch.int64 and got.score.shape == (0,)
    assert len(exit_head_partials(hidden, head)) == 0


# ---- the bundle, arguments ----


def test_stack_unstack_round_trip_and_bundle_merge():
    head = make_head(64, 900, torch.float32, "rms", seed=21)
    hidden = make_hidden(5, head, torch.float32)
    parts = sharded("torch", hidden, head, 4)
    bundle = ExitPartials.stack(parts)
    assert bundle.max_logit.shape == (4, 5) and bundle.top1_id.dtype == torch.int64 and len(bundle) == 5
    back = bundle.unstack()
    assert len(back) == 4
    for a, b in zip(back, parts, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.fields(), b.fields(), strict=True))
    for x, y in zip(
        merge_exit_partials(bundle, STOP_RULE).__dict__.values(),
        merge_exit_partials(parts, STOP_RULE).__dict__.values(),
        strict=True,
    ):
        assert torch.equal(x, y)
    # 28 bytes per row per rank.
    assert sum(f.element_size() for f in parts[0].fields()) == 28


def test_bad_arguments_are_refused():
    head = make_head(64, 300, torch.float32, "rms", subset=10, seed=22)
    hidden = make_hidden(2, head, torch.float32)
    with pytest.raises(ValueError, match="vocab_start must be 0 with a vocab_subset"):
        exit_head_partials(hidden, head, 5)
    full = make_head(64, 300, torch.float32, "rms", seed=22)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="vocab_start must be an int"):
            exit_head_partials(hidden, full, bad)
    with pytest.raises(RuntimeError, match="inference-only"):
        exit_head_partials(hidden.requires_grad_(), full)
    with pytest.raises(TypeError, match="non-empty sequence"):
        merge_exit_partials([])
    p = exit_head_partials(hidden.detach(), full)
    with pytest.raises(ValueError, match="same rows"):
        merge_exit_partials([p, exit_head_partials(hidden[:1].detach(), full)])
    with pytest.raises(ValueError, match=r"top1_id must be a torch\.int64"):
        merge_exit_partials([dataclasses.replace(p, top1_id=p.top1_id.int())])
    with pytest.raises(TypeError, match="stop_rule"):
        merge_exit_partials([p], stop_rule=0.5)


# ---- registered ops ----


def _op_args(hidden: torch.Tensor, head: ReadoutHead, start: int) -> tuple:
    cap = head.logit_softcap
    return (
        *(hidden, head.weight, head.norm, head.norm_weight, head.norm_bias, head.eps, head.project_out),
        *(head.vocab_subset, head.logit_bias, cap, start),
    )


def test_ops_opcheck():
    tests = ("test_schema", "test_faketensor")
    head = make_head(64, 500, torch.float32, "layer", softcap=10.0, seed=23)
    hidden = make_hidden(3, head, torch.float32)
    torch.library.opcheck(torch.ops.adainfer.exit_head_partials, _op_args(hidden, head, 7), test_utils=tests)
    sub = make_head(64, 500, torch.bfloat16, "rms", subset=33, bias=True, seed=24)
    torch.library.opcheck(
        torch.ops.adainfer.exit_head_partials, _op_args(make_hidden(2, sub, torch.bfloat16), sub, 0), test_utils=tests
    )
    bundle = ExitPartials.stack(sharded("torch", hidden, head, 3))
    torch.library.opcheck(torch.ops.adainfer.merge_exit_partials, (*bundle.fields(), 1.5, -2.0, 0.25), test_utils=tests)
    if HAS_NATIVE[torch.float32]:
        from adainfer_kernels.exit_head import _native_args

        _, args = _native_args(hidden, head, str(torch.ops.adainfer.exit_head_cpu_kernel(torch.float32)))
        torch.library.opcheck(torch.ops.adainfer.exit_head_cpu_stats, args, test_utils=tests)


def test_ops_trace_under_torch_compile():
    head = make_head(64, 400, torch.float32, "rms", seed=25)
    hidden = make_hidden(4, head, torch.float32)
    halves = [(shard_head(head, 0, 150), 0), (shard_head(head, 150, 400), 150)]

    def decide(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.ops.adainfer.exit_head_partials(*_op_args(h, s, start)) for s, start in halves]
        stacked = [torch.stack(f) for f in zip(*parts, strict=True)]
        return torch.ops.adainfer.merge_exit_partials(*stacked, 1.5, -2.0, 0.25)

    compiled = torch.compile(decide, fullgraph=True, backend="eager")
    with torch.inference_mode():
        got = compiled(hidden)
    want = exit_head(hidden, head, STOP_RULE)
    assert_same_signals(ExitSignals(*got), want, STOP_RULE, "compiled")
