"""Batch compaction: the C++ ops (torch.ops.adainfer.*), their Python wrappers and the fallbacks.

The spec is ``reference.compact_rows_ref`` (boolean indexing) and the ``*_ref`` functions beside it.
Every backend must agree with it bit for bit (compaction only copies), raise the same exception
types on bad input, and keep the bookkeeping invariant: every original row ends up exactly once in
the still-active set or among the finished rows, in order.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adainfer_kernels import _native, backend, compaction, reference

ops = torch.ops.adainfer
NATIVE = _native.has_op("compact_rows")
needs_native = pytest.mark.skipif(not NATIVE, reason=f"adainfer_kernels._C has no compaction ops: {_native.error()}")
# Backends the wrappers can take in this environment; "native" only with the extension.
BACKENDS = ["native", "torch", "reference"] if NATIVE else ["torch", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def use_backend(name: str):
    """Force the wrappers' backend choice (hypothesis tests cannot use function-scoped fixtures)."""
    with mock.patch.object(compaction, "_backend", lambda device: name):
        yield


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=gen)
    return torch.randn(shape, generator=gen).to(dtype)


def make_mask(kind: str, active: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.ones(active, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(active, dtype=torch.bool)
    if kind == "alternating":
        return torch.arange(active) % 2 == 0
    return torch.rand(active, generator=gen) > 0.5


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: what the C++ strided paths must handle."""
    if layout == "transposed" and t.dim() >= 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)  # rows not contiguous
    if layout == "sliced":
        return torch.cat([t, t]).view(2, *t.shape)[0]  # a view of a bigger buffer
    if layout == "expanded" and t.shape[0] > 0:
        return t[:1].expand_as(t)  # dim-0 stride 0 (like position ids expanded to the batch)
    return t


LAYER_SHAPES = {
    "hidden": lambda a, t, d: (a, t, d),
    "mask2d": lambda a, t, d: (a, t),
    "mask4d": lambda a, t, d: (a, 1, t, t),
    "position_ids": lambda a, t, d: (a, t),
    "rows_1d": lambda a, t, d: (a,),
    "empty_rows": lambda a, t, d: (a, 0, d),
}


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: values differ, first mismatching indices {bad}")


# ---------------------------------------------------------------------------------------------
# opcheck: schemas, fake implementations, dynamic-shape tracing
# ---------------------------------------------------------------------------------------------


def _compact_samples():
    gen = torch.Generator().manual_seed(0)
    keep = torch.tensor([True, False, True, True, False])
    rows = torch.tensor([4, 0, 3, 1, 2])
    hidden = random_tensor((5, 3, 8), torch.bfloat16, gen)
    mask4 = torch.ones(5, 1, 3, 3, dtype=torch.bool)
    yield keep, rows, [hidden, mask4, torch.arange(3).expand(5, 3), hidden.float().transpose(1, 2)]
    yield keep, rows, [random_tensor((5,), torch.int64, gen), random_tensor((5, 2), torch.float16, gen)]
    yield torch.zeros(3, dtype=torch.bool), torch.arange(3), [torch.randn(3, 4)]
    yield torch.ones(1, dtype=torch.bool), torch.tensor([7]), [torch.randn(1, 4)]
    yield torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64), [torch.zeros(0, 2, 3)]
    yield keep, rows, []


@needs_native
@pytest.mark.parametrize("args", list(_compact_samples()), ids=lambda a: f"A{a[0].numel()}x{len(a[2])}")
def test_opcheck_compact_rows(args):
    torch.library.opcheck(ops.compact_rows.default, args)


@needs_native
@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(2, 3, 4), torch.tensor([4, 1]), torch.randn(3, 3, 4), torch.tensor([0, 3, 2]), 5),
        (torch.randn(2, 4, 3).transpose(1, 2), torch.tensor([0, 1]), torch.randn(0, 3, 4), torch.zeros(0).long(), 2),
        (torch.ones(0, 2, dtype=torch.bool), torch.zeros(0).long(), torch.ones(2, 2, dtype=torch.bool),
         torch.tensor([1, 0]), 2),
    ],
    ids=["fp32", "strided", "bool_all_fill"],
)  # fmt: skip
def test_opcheck_merge_rows(args):
    torch.library.opcheck(ops.merge_rows.default, args)


@needs_native
@pytest.mark.parametrize(
    "args",
    [
        (torch.zeros(5, 3), torch.tensor([4, 0]), torch.randn(2, 3)),
        (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(0).long(), torch.zeros(0, 2, dtype=torch.int64)),
        (torch.zeros(3, 4).t().contiguous().t(), torch.tensor([2]), torch.randn(1, 4)),
    ],
    ids=["fp32", "empty", "strided_out"],
)
def test_opcheck_scatter_rows(args):
    torch.library.opcheck(ops.scatter_rows.default, args)


@needs_native
def test_wrappers_trace_fullgraph_under_torch_compile():
    def layer_state_step(keep, row_map, hidden, mask, cos):
        c = compaction.compact_rows(keep, row_map, [hidden, mask, cos, None])
        merged = compaction.merge_rows(c.tensors[0], c.kept, hidden[c.finished], c.finished, hidden.shape[0])
        return c.tensors[0] * 2, c.tensors[1], c.row_map, c.finished_rows, merged

    compiled = torch.compile(layer_state_step, fullgraph=True, backend="aot_eager")
    for keep in ([True, False, True, True], [False, False, True, False, True, True]):
        a = len(keep)
        args = (torch.tensor(keep), torch.arange(10, 10 + a), torch.randn(a, 3, 8), torch.rand(a, 3) > 0.5,
                torch.randn(1, 3, 8))  # fmt: skip
        for got, want in zip(compiled(*args), layer_state_step(*args), strict=True):
            assert_same(got, want, "compiled vs eager")


# ---------------------------------------------------------------------------------------------
# Properties against the reference
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(
    active=st.integers(0, 9),
    mask_kind=st.sampled_from(["all", "none", "alternating", "random"]),
    dtype=st.sampled_from(DTYPES),
    kinds=st.lists(st.sampled_from(sorted(LAYER_SHAPES)), min_size=1, max_size=4),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
    seq=st.integers(1, 5),
    with_broadcast=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_rows_matches_reference_on_every_backend(
    active, mask_kind, dtype, kinds, layout, seq, with_broadcast, seed
):
    gen = torch.Generator().manual_seed(seed)
    keep = make_mask(mask_kind, active, gen)
    batch = active + 3
    row_map = torch.randperm(batch, generator=gen)[:active]  # some original rows, any order
    tensors: list[torch.Tensor | None] = [
        make_layout(random_tensor(LAYER_SHAPES[k](active, seq, 6), dtype, gen), layout) for k in kinds
    ]
    if with_broadcast:
        tensors += [random_tensor((1, seq, 6), dtype, gen), None]  # a shared cos/sin and an absent tensor
    want, want_rows, want_finished_rows = reference.compact_rows_ref(keep, row_map, tensors)
    for name in BACKENDS:
        with use_backend(name):
            got = compaction.compact_rows(keep, row_map, tensors)
        assert_same(got.row_map, want_rows, f"{name} row_map")
        assert_same(got.finished_rows, want_finished_rows, f"{name} finished_rows")
        assert_same(got.kept, torch.nonzero(keep).squeeze(1), f"{name} kept")
        assert_same(got.finished, torch.nonzero(~keep).squeeze(1), f"{name} finished")
        # Every original row exactly once across still-active and finished, order preserved.
        assert sorted(got.row_map.tolist() + got.finished_rows.tolist()) == sorted(row_map.tolist())
        assert len(got.tensors) == len(tensors)
        for i, (g, w, t) in enumerate(zip(got.tensors, want, tensors, strict=True)):
            if t is None or (t.shape[0] == 1 and active != 1):
                assert g is t, f"{name}: tensors[{i}] is a broadcast or None and must pass through unchanged"
            else:
                assert_same(g, w, f"{name} tensors[{i}] ({kinds[i] if i < len(kinds) else 'extra'}, {layout})")


@PROPERTY
@given(
    batch=st.integers(1, 12),
    dtype=st.sampled_from(DTYPES),
    checked_layers=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_loop_bookkeeping_returns_every_row_once_in_order(batch, dtype, checked_layers, seed):
    """A whole run: rows exit over several events, then scatter_rows restores batch order."""
    gen = torch.Generator().manual_seed(seed)
    hidden = random_tensor((batch, 3, 4), dtype, gen)
    for name in BACKENDS:
        with use_backend(name):
            row_map = torch.arange(batch)
            state = [hidden, torch.ones(1, 3)]  # a batch-leading tensor and a broadcast
            exits = torch.full((batch,), -1)
            last = torch.zeros_like(hidden)
            for layer in range(checked_layers + 1):
                keep = torch.rand(row_map.numel(), generator=gen) > 0.4
                if layer == checked_layers:
                    keep[:] = False  # the last layer: every row still active finishes
                c = compaction.compact_rows(keep, row_map, state)
                compaction.scatter_rows(last, c.finished_rows, state[0][c.finished])
                compaction.scatter_rows(exits, c.finished_rows, torch.full((c.finished_rows.numel(),), layer))
                row_map, state = c.row_map, c.tensors
            assert row_map.numel() == 0
            assert bool((exits >= 0).all()), f"{name}: a row never finished: {exits.tolist()}"
            assert_same(last, hidden, f"{name} rows scattered back")


@PROPERTY
@given(
    batch=st.integers(0, 10),
    dtype=st.sampled_from(DTYPES),
    trailing=st.sampled_from([(), (3,), (2, 5, 4)]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_rows_matches_reference_on_every_backend(batch, dtype, trailing, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(batch, generator=gen)
    n_active = int(torch.randint(0, batch + 1, (1,), generator=gen))
    active_rows, fill_rows = perm[:n_active], perm[n_active:]
    active_values = make_layout(random_tensor((n_active, *trailing), dtype, gen), layout)
    fill_values = random_tensor((batch - n_active, *trailing), dtype, gen)
    want = reference.merge_rows_ref(active_values, active_rows, fill_values, fill_rows, batch)
    for name in BACKENDS:
        with use_backend(name):
            got = compaction.merge_rows(active_values, active_rows, fill_values, fill_rows, batch)
        assert_same(got, want, f"{name} merge_rows ({layout})")
        assert got.is_contiguous()


@PROPERTY
@given(
    batch=st.integers(0, 10),
    dtype=st.sampled_from(DTYPES),
    trailing=st.sampled_from([(), (4,), (3, 2)]),
    strided_out=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_scatter_rows_matches_reference_on_every_backend(batch, dtype, trailing, strided_out, seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, batch + 1, (1,), generator=gen))
    rows = torch.randperm(batch, generator=gen)[:n]
    values = random_tensor((n, *trailing), dtype, gen)
    base = random_tensor((batch, *trailing), dtype, gen)
    want = reference.scatter_rows_ref(base.clone(), rows, values)
    for name in BACKENDS:
        out = make_layout(base.clone(), "transposed" if strided_out else "contiguous")
        with use_backend(name):
            returned = compaction.scatter_rows(out, rows, values)
        assert returned is out, f"{name}: scatter_rows must return its out argument"
        assert_same(out, want, f"{name} scatter_rows")


# ---------------------------------------------------------------------------------------------
# Bad input: the same exception type on every backend, and from the ops themselves
# ---------------------------------------------------------------------------------------------

K, R, X = torch.tensor([True, False, True]), torch.tensor([5, 6, 7]), torch.randn(3, 4)
COMPACT_ERRORS = {
    "mask_not_bool": (TypeError, lambda: (K.int(), R, [X])),
    "mask_2d": (ValueError, lambda: (K.view(1, 3), R, [X])),
    "row_map_not_int64": (TypeError, lambda: (K, R.int(), [X])),
    "row_map_length": (ValueError, lambda: (K, torch.arange(4), [X])),
    "tensor_rows": (ValueError, lambda: (K, R, [torch.randn(2, 4)])),
    "tensor_0d": (ValueError, lambda: (K, R, [torch.tensor(1.0)])),
    "tensor_device": (ValueError, lambda: (K, R, [torch.empty(3, 4, device="meta")])),
    "row_map_device": (ValueError, lambda: (K, torch.empty(3, dtype=torch.int64, device="meta"), [X])),
}
MERGE_ERRORS = {
    "row_out_of_range": (IndexError, lambda: (X[:2], torch.tensor([0, 3]), X[:1], torch.tensor([1]), 3)),
    "row_negative": (IndexError, lambda: (X[:2], torch.tensor([0, -1]), X[:1], torch.tensor([1]), 3)),
    "row_repeated": (IndexError, lambda: (X[:2], torch.tensor([0, 1]), X[:1], torch.tensor([1]), 3)),
    "batch_size": (ValueError, lambda: (X[:2], torch.tensor([0, 2]), X[:1], torch.tensor([1]), 4)),
    "rows_not_int64": (TypeError, lambda: (X[:2], torch.tensor([0, 2]).int(), X[:1], torch.tensor([1]), 3)),
    "rows_2d": (ValueError, lambda: (X[:2], torch.tensor([[0, 2]]), X[:1], torch.tensor([1]), 3)),
    "values_vs_rows": (ValueError, lambda: (X[:2], torch.tensor([0]), X[:2], torch.tensor([1, 2]), 3)),
    "fill_dtype": (TypeError, lambda: (X[:2], torch.tensor([0, 2]), X[:1].half(), torch.tensor([1]), 3)),
    "fill_shape": (ValueError, lambda: (X[:2], torch.tensor([0, 2]), torch.randn(1, 5), torch.tensor([1]), 3)),
    "device": (ValueError, lambda: (X[:2], torch.tensor([0, 2]), X[:1], torch.tensor([1], device="meta"), 3)),
}
SCATTER_ERRORS = {
    "row_out_of_range": (IndexError, lambda: (torch.zeros(3, 4), torch.tensor([3]), X[:1])),
    "row_repeated": (IndexError, lambda: (torch.zeros(3, 4), torch.tensor([1, 1]), X[:2])),
    "rows_not_int64": (TypeError, lambda: (torch.zeros(3, 4), torch.tensor([1]).int(), X[:1])),
    "values_shape": (ValueError, lambda: (torch.zeros(3, 4), torch.tensor([1]), torch.randn(1, 5))),
    "values_dtype": (TypeError, lambda: (torch.zeros(3, 4), torch.tensor([1]), X[:1].double())),
    "out_0d": (ValueError, lambda: (torch.tensor(0.0), torch.tensor([0]), torch.randn(1))),
    "device": (ValueError, lambda: (torch.zeros(3, 4), torch.tensor([1], device="meta"), X[:1])),
    "expanded_out": (RuntimeError, lambda: (torch.zeros(1, 4).expand(3, 4), torch.tensor([1]), X[:1])),
    "values_alias_out": (RuntimeError, lambda: (X, torch.tensor([2]), X[:1])),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(COMPACT_ERRORS))
def test_compact_rows_refuses_bad_input(backend_name, case):
    error, make_args = COMPACT_ERRORS[case]
    with use_backend(backend_name), pytest.raises(error, match="compact_rows"):
        compaction.compact_rows(*make_args())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(MERGE_ERRORS))
def test_merge_rows_refuses_bad_input(backend_name, case):
    error, make_args = MERGE_ERRORS[case]
    with use_backend(backend_name), pytest.raises(error):
        compaction.merge_rows(*make_args())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(SCATTER_ERRORS))
def test_scatter_rows_refuses_bad_input(backend_name, case):
    error, make_args = SCATTER_ERRORS[case]
    args = make_args()
    before = args[0].clone() if args[0].device.type == "cpu" else None
    with use_backend(backend_name), pytest.raises(error):
        compaction.scatter_rows(*args)
    if before is not None:
        assert torch.equal(args[0], before), "a refused scatter must not have written anything"


@needs_native
@pytest.mark.parametrize("case", sorted(COMPACT_ERRORS))
def test_compact_rows_op_refuses_bad_input_itself(case):
    # The wrapper checks first; the op must be safe on its own too (torch.ops callers, C++ callers).
    error, make_args = COMPACT_ERRORS[case]
    keep, row_map, tensors = make_args()
    with pytest.raises(error, match="compact_rows"):
        ops.compact_rows(keep, row_map, tensors)


@needs_native
def test_compact_rows_op_refuses_broadcasts_which_the_wrapper_passes_around():
    with pytest.raises(ValueError, match="broadcast"):
        ops.compact_rows(K, R, [torch.randn(1, 4)])


@needs_native
@pytest.mark.parametrize("case", sorted(MERGE_ERRORS))
def test_merge_rows_op_refuses_bad_input_itself(case):
    error, make_args = MERGE_ERRORS[case]
    with pytest.raises(error):
        ops.merge_rows(*make_args())


@needs_native
@pytest.mark.parametrize("case", sorted(SCATTER_ERRORS))
def test_scatter_rows_op_refuses_bad_input_itself(case):
    error, make_args = SCATTER_ERRORS[case]
    args = make_args()
    with pytest.raises(error):
        ops.scatter_rows(*args)


# ---------------------------------------------------------------------------------------------
# Backend selection, fallbacks, autograd
# ---------------------------------------------------------------------------------------------


@needs_native
def test_wrappers_use_the_native_ops_when_the_extension_is_loaded():
    assert backend.compaction_backend("cpu").name == "native"
    calls = []
    real = ops.compact_rows.default

    def spy(*args):
        calls.append(args)
        return real(*args)

    with mock.patch.object(ops.compact_rows, "default", spy):
        compaction.compact_rows(K, R, [X, None, torch.ones(1, 4)])
    assert len(calls) == 1
    assert len(calls[0][2]) == 1, "only the batch-leading tensor goes to the op"


def test_fallback_when_the_extension_is_unavailable(monkeypatch):
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", "not built (monkeypatched for the test)")
    monkeypatch.delenv("ADAINFER_BACKEND", raising=False)
    choice = backend.compaction_backend("cpu")
    assert choice.name == "torch" and "monkeypatched" in choice.reason

    class Refuse:
        """Stands in for an op packet: any call of any overload fails the test."""

        def __getattr__(self, overload):
            raise AssertionError("the native op must not be called without the extension")

        def __call__(self, *args):
            raise AssertionError("the native op must not be called without the extension")

    for name in ("compact_rows", "merge_rows", "scatter_rows"):
        monkeypatch.setattr(torch.ops.adainfer, name, Refuse(), raising=False)
    c = compaction.compact_rows(K, R, [X, None])
    assert_same(c.tensors[0], X[K], "fallback compact")
    assert c.tensors[1] is None
    assert c.row_map.tolist() == [5, 7] and c.finished_rows.tolist() == [6]
    merged = compaction.merge_rows(c.tensors[0], torch.tensor([0, 2]), X[1:2], torch.tensor([1]), 3)
    assert_same(merged, X, "fallback merge")
    out = torch.zeros(3, 4)
    compaction.scatter_rows(out, torch.tensor([2, 0]), c.tensors[0])
    assert_same(out[[2, 0]], c.tensors[0], "fallback scatter")
    with pytest.raises(IndexError):
        compaction.merge_rows(X[:2], torch.tensor([0, 0]), X[:1], torch.tensor([1]), 3)


def test_reference_backend_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("ADAINFER_BACKEND", "reference")
    assert compaction._backend(torch.device("cpu")) == "reference"
    with mock.patch.object(reference, "compact_rows_ref", wraps=reference.compact_rows_ref) as spy:
        c = compaction.compact_rows(K, R, [X])
    assert spy.call_count == 1
    assert_same(c.tensors[0], X[K], "reference compact")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inputs_requiring_grad_get_a_differentiable_result(backend_name):
    hidden = torch.randn(3, 4, requires_grad=True)
    with use_backend(backend_name):
        c = compaction.compact_rows(K, R, [hidden])
        merged = compaction.merge_rows(c.tensors[0], torch.tensor([2, 0]), torch.zeros(1, 4), torch.tensor([1]), 3)
    merged.sum().backward()
    assert_same(hidden.grad, K[:, None].float().expand(3, 4), f"{backend_name} grad")


@needs_native
def test_native_ops_under_inference_mode():
    with torch.inference_mode():
        c = compaction.compact_rows(K, R, [X])
        merged = compaction.merge_rows(c.tensors[0], c.kept, X[c.finished], c.finished, 3)
    assert_same(merged, X, "inference_mode merge")


# ---------------------------------------------------------------------------------------------
# CUDA kernels: run only with a CUDA torch, a GPU and _C built with CUDA (the lent-GPU check:
# `pip install --no-build-isolation -e .` there, then `pytest tests/csrc/test_compaction.py -k cuda`).
# ---------------------------------------------------------------------------------------------

CUDA_NATIVE = NATIVE and torch.cuda.is_available() and bool((_native.build_info() or {}).get("with_cuda"))
_skip_without_cuda = pytest.mark.skipif(not CUDA_NATIVE, reason="needs a GPU and _C built against a CUDA torch")


def needs_cuda(test):
    """Marks ``test`` ``gpu`` (bench/gpu_check.sh runs ``pytest -m gpu``); it skips without a CUDA build of _C."""
    return pytest.mark.gpu(_skip_without_cuda(test))


@needs_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    active=st.sampled_from([0, 1, 2, 7, 1023, 1024, 1025, 3000]),  # 1024 = one scan chunk
    mask_kind=st.sampled_from(["all", "none", "alternating", "random"]),
    dtype=st.sampled_from(DTYPES),
    trailing=st.sampled_from([(), (3,), (5, 7), (1, 3, 3)]),  # odd row bytes: narrow vector widths
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "offset"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cuda_compact_rows_matches_reference(active, mask_kind, dtype, trailing, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = make_mask(mask_kind, active, gen)
    row_map = torch.randperm(active + 5, generator=gen)[:active]
    base = random_tensor((active, *trailing), dtype, gen)
    if layout == "offset":  # a view starting one element in: misaligned rows (byte-wise copies)
        t = torch.cat([base.flatten(), base.flatten()[:1]])[1:].view(base.shape) if base.numel() else base
    else:
        t = make_layout(base, layout)
    want, want_rows, want_finished = reference.compact_rows_ref(keep, row_map, [t])
    out, rows, kept, finished, finished_rows = ops.compact_rows(keep.cuda(), row_map.cuda(), [t.cuda()])
    assert_same(out[0].cpu(), want[0], f"cuda compacted ({layout})")
    assert_same(rows.cpu(), want_rows, "cuda row_map")
    assert_same(finished_rows.cpu(), want_finished, "cuda finished_rows")
    assert_same(kept.cpu(), torch.nonzero(keep).squeeze(1), "cuda kept")
    assert_same(finished.cpu(), torch.nonzero(~keep).squeeze(1), "cuda finished")


@needs_cuda
def test_cuda_compact_rows_large_rows_and_many_rows():
    # Rows longer than one launch's blocks (grid-stride over a row) and more rows than grid.y.
    big = torch.randn(6, 1 << 20, device="cuda")
    many = torch.arange(70000, dtype=torch.int32, device="cuda")[:, None]
    for t in (big, many):
        keep = torch.rand(t.shape[0], device="cuda") > 0.3
        got = ops.compact_rows(keep, torch.arange(t.shape[0], device="cuda"), [t])[0][0]
        assert_same(got, t[keep], f"cuda rows of shape {tuple(t.shape)}")


@needs_cuda
def test_cuda_compact_rows_syncs_once_per_event():
    keep, row_map, tensors = (torch.rand(64, device="cuda") > 0.5), torch.arange(64, device="cuda"), [
        torch.randn(64, 16, 32, device="cuda"), torch.ones(64, 1, 16, 16, dtype=torch.bool, device="cuda"),
        torch.arange(16, device="cuda").expand(64, 16), torch.randn(64, 16, 8, device="cuda"),
    ]  # fmt: skip
    torch.cuda.synchronize()

    def syncs(fn) -> int:
        """Host syncs of fn, counted by torch's sync debug mode (one warning per sync)."""
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in record)

    assert syncs(lambda: ops.compact_rows(keep, row_map, tensors)) == 1
    assert syncs(lambda: compaction.compact_rows(keep, row_map, tensors)) == 1
    assert syncs(lambda: ops.compact_rows(keep[:0], row_map[:0], [t[:0] for t in tensors])) == 0
    assert syncs(lambda: [t[keep] for t in tensors]) >= len(tensors)  # the baseline syncs per tensor


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_and_scatter_match_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    for batch, trailing in [(0, (3,)), (1, ()), (9, (3, 5)), (40, (2, 64, 33))]:
        perm = torch.randperm(batch, generator=gen)
        n = batch // 3
        av = random_tensor((n, *trailing), dtype, gen)
        fv = random_tensor((batch - n, *trailing), dtype, gen)
        want = reference.merge_rows_ref(av, perm[:n], fv, perm[n:], batch)
        got = ops.merge_rows(av.cuda(), perm[:n].cuda(), make_layout(fv, "transposed").cuda(), perm[n:].cuda(), batch)
        assert_same(got.cpu(), want, f"cuda merge B{batch}")
        out = torch.zeros_like(want).cuda()
        ops.scatter_rows(out, perm[:n].cuda(), av.cuda())
        assert_same(out[perm[:n].cuda()].cpu(), av, f"cuda scatter B{batch}")


@needs_cuda
@pytest.mark.parametrize("case", ["row_out_of_range", "row_negative", "row_repeated"])
def test_cuda_bad_rows_raise_and_leave_the_device_usable(case):
    _, make_args = MERGE_ERRORS[case]
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in make_args()]
    with pytest.raises(IndexError):
        ops.merge_rows(*args)
    out = torch.zeros(3, 4, device="cuda")
    with pytest.raises(IndexError):
        ops.scatter_rows(out, args[1], args[0])
    assert_same(out.cpu(), torch.zeros(3, 4), "a refused scatter wrote nothing")
    torch.cuda.synchronize()  # no device-side assert: the context still works
    assert float(torch.ones(1, device="cuda").sum()) == 1.0


@needs_cuda
def test_cuda_opcheck():
    for keep, row_map, tensors in _compact_samples():
        torch.library.opcheck(ops.compact_rows.default, (keep.cuda(), row_map.cuda(), [t.cuda() for t in tensors]))
    torch.library.opcheck(
        ops.merge_rows.default,
        (torch.randn(2, 3, device="cuda"), torch.tensor([0, 2], device="cuda"), torch.randn(1, 3, device="cuda"),
         torch.tensor([1], device="cuda"), 3),
    )  # fmt: skip
    torch.library.opcheck(
        ops.scatter_rows.default,
        (torch.zeros(5, 3, device="cuda"), torch.tensor([4, 0], device="cuda"), torch.randn(2, 3, device="cuda")),
    )
