"""The fused exit head on every backend against ``reference.exit_head_ref``.

Tolerances: see exit_head_helpers.py (2x PyTorch's own same-dtype error + 1e-5; argmax exact
off near-ties).

Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small awkward shapes; the CPU
paths (native op and torch fallback) also run at real sizes.
"""

from __future__ import annotations

import functools
import gc
import itertools
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from exit_head_helpers import (
    DTYPES,
    STOP_RULE,
    check_signals,
    hf_numerics_signals,
    make_head,
    make_hidden,
)

from adainfer_kernels import exit_head
from adainfer_kernels.exit_head import _PACKED, _exit_head_cpu, _native_supports, clear_cache, cpu_impl
from adainfer_kernels.exit_head_triton import _tanh, exit_head_triton, pick_config
from adainfer_kernels.head import NORM_CODES, ExitSignals, ReadoutHead, StopRule
from adainfer_kernels.reference import exit_head_ref

exit_head_mod = sys.modules["adainfer_kernels.exit_head"]

HAS_NATIVE = {dt: _native_supports(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
CPU_IMPLS = ["torch"] + (["native"] if any(HAS_NATIVE.values()) else [])


def run_backend(backend: str, hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None, **kw) -> ExitSignals:
    if backend in ("splitv", "rowtile"):
        return exit_head_triton(hidden, head, stop_rule, variant=backend, **kw)
    if backend in ("native", "torch"):
        if backend == "native" and not HAS_NATIVE[head.weight.dtype]:
            # e.g. fp32 needs oneDNN's brgemm, which some CPU/torch builds lack
            pytest.skip(f"the native CPU exit head cannot run {head.weight.dtype} on this CPU")
        with torch.inference_mode():
            return _exit_head_cpu(hidden, head, stop_rule, impl=backend)
    if backend == "reference":
        return exit_head_ref(hidden, head, stop_rule)
    raise ValueError(backend)


BACKENDS = ["splitv", "rowtile", *CPU_IMPLS, "reference"]


# ---- Triton kernels under the interpreter ----

_SWEEP = list(itertools.product(("splitv", "rowtile"), ("fp32", "fp16", "bf16"), ("rms", "layer", "none")))


def _sweep_case(i: int, variant: str, dt: str, norm: str) -> tuple:
    # Every R, d and V value meets every variant, dtype and norm; subset and stop rule alternate.
    n_rows = (1, 3, 17)[i % 3]
    d = (64, 96)[(i // 3) % 2]
    n_vocab = (1000, 3001)[(i // 2) % 2]
    subset = 37 if i % 4 == 1 else None
    return variant, dt, norm, n_rows, d, n_vocab, subset, i % 2 == 0


@pytest.mark.parametrize(
    "variant,dt,norm,n_rows,d,n_vocab,subset,with_rule",
    [_sweep_case(i, *c) for i, c in enumerate(_SWEEP)],
    ids=lambda v: str(v),
)
def test_triton_matches_reference(variant, dt, norm, n_rows, d, n_vocab, subset, with_rule):
    dtype = DTYPES[dt]
    head = make_head(d, n_vocab, dtype, norm, subset=subset, bias=subset is not None, seed=n_rows + d)
    hidden = make_hidden(n_rows, head, dtype)
    stop_rule = STOP_RULE if with_rule else None
    got = exit_head_triton(hidden, head, stop_rule, variant=variant)
    check_signals(got, hidden, head, stop_rule)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
@pytest.mark.parametrize("dt,norm", [("bf16", "rms"), ("fp16", "layer"), ("bf16", "layer")])
def test_triton_reproduces_hf_rounding_exactly(variant, dt, norm):
    """The kernel rounds the normed state like HF and keeps fp32 logits: far tighter than 2x-PyTorch.
    (Truncating instead of rounding to nearest even would move top_prob by ~1e-3 here.)"""
    dtype = DTYPES[dt]
    head = make_head(96, 1000, dtype, norm, logit_scale=6.0, seed=3)
    hidden = make_hidden(5, head, dtype, seed=4)
    got = exit_head_triton(hidden, head, STOP_RULE, variant=variant)
    want = hf_numerics_signals(hidden, head, STOP_RULE)
    for name in ("top_prob", "gap", "score"):
        err = (getattr(got, name) - getattr(want, name)).abs().max().item()
        assert err <= 2e-5, f"{name}: max err {err:.3e} vs HF-rounded fp32-logit reference"
    assert torch.equal(got.argmax, want.argmax)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
@pytest.mark.parametrize("dt,norm", [("bf16", "layer"), ("fp32", "rms")])
def test_triton_project_out(variant, dt, norm):
    dtype = DTYPES[dt]
    head = make_head(64, 1000, dtype, norm, d_in=96, seed=5)
    assert head.hidden_size == 96
    hidden = make_hidden(3 if variant == "splitv" else 17, head, dtype)
    check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
@pytest.mark.parametrize("n_splits", [1, 3, 1000])
def test_triton_split_counts_agree(variant, n_splits):
    """1 split, a few, and one tile per split (the most partials) all give the reference."""
    head = make_head(64, 3001, torch.float16, "rms", subset=700, bias=True, seed=6)
    hidden = make_hidden(3, head, torch.float16)
    check_signals(
        exit_head_triton(hidden, head, STOP_RULE, variant=variant, n_splits=n_splits), hidden, head, STOP_RULE
    )


def test_triton_unaligned_layout_uses_small_tiles():
    """d = 97 (not a multiple of 16): the launcher picks the unaligned configs; results still exact."""
    assert pick_config(3, torch.bfloat16, aligned=False).block_d == 32
    head = make_head(97, 1000, torch.bfloat16, "rms", seed=7)
    for n_rows, variant in ((2, "splitv"), (17, "rowtile")):
        hidden = make_hidden(n_rows, head, torch.bfloat16)
        check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)


# ---- the CPU paths ----


@functools.lru_cache(maxsize=2)
def _real_head(d: int, n_vocab: int, dtype: torch.dtype, norm: str) -> ReadoutHead:
    return make_head(d, n_vocab, dtype, norm, seed=d)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(
    "dt,norm,n_rows,d,n_vocab",
    [
        ("fp32", "rms", 1, 576, 49152),
        ("fp32", "rms", 8, 576, 49152),
        ("bf16", "rms", 8, 576, 49152),
        ("bf16", "rms", 64, 576, 49152),
        ("fp16", "layer", 8, 576, 49152),
        ("bf16", "layer", 200, 576, 49152),  # the bf16 kernel's packed tiles (many rows)
        ("fp16", "rms", 64, 576, 49152),
        ("bf16", "rms", 1, 4096, 32000),
        ("bf16", "rms", 8, 4096, 32000),
        ("bf16", "rms", 130, 4096, 32000),  # packed tiles (>= 128 rows) at a Llama width
        ("fp16", "rms", 8, 4096, 32000),
    ],
)
def test_cpu_path_real_sizes(impl, dt, norm, n_rows, d, n_vocab):
    dtype = DTYPES[dt]
    head = _real_head(d, n_vocab, dtype, norm)
    hidden = make_hidden(n_rows, head, dtype)
    check_signals(run_backend(impl, hidden, head, STOP_RULE), hidden, head, STOP_RULE)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
def test_cpu_path_small_shapes(impl, dt, norm):
    dtype = DTYPES[dt]
    for n_rows, d, n_vocab, subset in ((1, 64, 1000, None), (3, 96, 3001, 37), (17, 97, 130, 65), (70, 64, 5000, None)):
        head = make_head(d, n_vocab, dtype, norm, subset=subset, bias=subset is not None, seed=n_rows)
        hidden = make_hidden(n_rows, head, dtype)
        check_signals(run_backend(impl, hidden, head, STOP_RULE), hidden, head, STOP_RULE)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_project_out_and_hf_rounding(impl):
    head = make_head(64, 2000, torch.bfloat16, "layer", d_in=96, seed=8)
    hidden = make_hidden(9, head, torch.bfloat16)
    check_signals(run_backend(impl, hidden, head, STOP_RULE), hidden, head, STOP_RULE)
    head = make_head(96, 1000, torch.bfloat16, "rms", logit_scale=6.0, seed=3)
    hidden = make_hidden(5, head, torch.bfloat16, seed=4)
    got, want = run_backend(impl, hidden, head, STOP_RULE), hf_numerics_signals(hidden, head, STOP_RULE)
    assert (got.top_prob - want.top_prob).abs().max().item() <= 2e-5
    assert torch.equal(got.argmax, want.argmax)


def test_native_cpu_op_registration():
    if not HAS_NATIVE[torch.float32]:
        pytest.skip("the native CPU exit head is unavailable here")
    ops = torch.ops.adainfer
    w = torch.randn(130, 64)
    packed = ops.exit_head_cpu_pack(w)
    assert packed.shape == (3, 64 * 64)
    h, g, b = torch.randn(5, 64), torch.rand(64) + 0.5, torch.randn(64)
    torch.library.opcheck(ops.exit_head_cpu_pack.default, (w,))
    torch.library.opcheck(ops.exit_head_cpu.default, (h, packed, 130, 2, g, b, 1e-5, torch.randn(130)))
    with pytest.raises(RuntimeError, match="packed was made for d=64"):
        ops.exit_head_cpu(torch.randn(5, 65), packed, 130, 0, None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match="n_cand=300"):
        ops.exit_head_cpu(h, packed, 300, 0, None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.exit_head_cpu(h, packed, 130, 0, None, None, 1e-5, torch.randn(7))
    with pytest.raises(RuntimeError, match="needs norm_weight"):
        ops.exit_head_cpu(h, packed, 130, 1, None, None, 1e-5, None)
    # bf16 rows with fp32 panels: brgemm (AMX CPUs) wants bf16 panels, the row-major kernels the weight.
    with pytest.raises(RuntimeError, match=r"packed must be BFloat16|takes the weight as it is stored"):
        ops.exit_head_cpu(h.bfloat16(), packed, 130, 0, None, None, 1e-5, None)


def test_native_cpu_op_softcap_argument():
    if not HAS_NATIVE[torch.float32]:
        pytest.skip("the native CPU exit head is unavailable here")
    ops = torch.ops.adainfer
    w = torch.randn(130, 64) * 2.0
    packed = ops.exit_head_cpu_pack(w)
    h = torch.randn(5, 64)
    torch.library.opcheck(ops.exit_head_cpu.default, (h, packed, 130, 0, None, None, 1e-5, torch.randn(130), 3.0))
    # softcap=None (the default) is the uncapped op; a cap changes the result.
    plain = ops.exit_head_cpu(h, packed, 130, 0, None, None, 1e-5, None)
    default = ops.exit_head_cpu(h, packed, 130, 0, None, None, 1e-5, None, None)
    capped = ops.exit_head_cpu(h, packed, 130, 0, None, None, 1e-5, None, 3.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, default, strict=True))
    assert (plain[0] - capped[0]).abs().max() > 1e-2
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-40):
        with pytest.raises(RuntimeError, match="softcap must be a finite float > 0"):
            ops.exit_head_cpu(h, packed, 130, 0, None, None, 1e-5, None, bad)


# ---- the native op's kernels, each forced through the op's `kernel` argument ----

KERNELS = {
    torch.bfloat16: ("brgemm", "avx512bf16", "avx512", "scalar"),
    torch.float16: ("brgemm", "avx512", "scalar"),
}


def _kernel_runs(kernel: str, dtype: torch.dtype) -> bool:
    """Whether the op runs ``kernel`` for ``dtype`` rows here (it refuses with "cannot run" otherwise)."""
    if cpu_impl() != "native":
        return False
    ops = torch.ops.adainfer
    x = torch.ones(1, 2, dtype=dtype)
    if kernel == "brgemm":
        cdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        try:
            w = ops.exit_head_cpu_pack(torch.ones(1, 2, dtype=cdt))
        except RuntimeError as exc:
            assert "no brgemm" in str(exc)
            return False
    else:
        w = torch.ones(1, 2, dtype=dtype)
    try:
        ops.exit_head_cpu(x, w, 1, 0, None, None, 1e-5, None, None, kernel)
    except RuntimeError as exc:
        assert "cannot run" in str(exc), str(exc)
        return False
    return True


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _op_signals(hidden, head, norm: str, kernel: str, cap) -> ExitSignals:
    ops = torch.ops.adainfer
    w = head.weight if head.vocab_subset is None else head.weight[head.vocab_subset]
    if kernel == "brgemm":
        w = ops.exit_head_cpu_pack(w if w.dtype == torch.bfloat16 else w.float())
    nw, nb = (head.norm_weight, head.norm_bias) if norm != "none" else (None, None)
    with torch.inference_mode():
        top, gap, pos = ops.exit_head_cpu(
            hidden, w, head.n_candidates, NORM_CODES[norm], nw, nb, head.eps, head.logit_bias, cap, kernel
        )
    argmax = pos if head.vocab_subset is None else head.vocab_subset[pos]
    return ExitSignals(top, gap, argmax, STOP_RULE(top, gap))


@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
@pytest.mark.parametrize(
    "dt,kernel", [(dt, k) for dt, ks in KERNELS.items() for k in ks], ids=lambda v: str(v).replace("torch.", "")
)
def test_native_half_kernels_match_the_fp32_reference(dt, kernel, norm):
    """Each kernel of the op for bf16 / fp16 heads, forced, on every shape class it has: the dot tiles
    (1 to 70 rows), the bf16 kernel's packed tiles (>= 128 rows), d
    not a multiple of the vector (97, 33), candidates not a multiple of the tile (130, 3001), a subset
    with a logit bias, a soft-cap; against the fp32 reference under the tolerance rule (check_signals).
    Kernels this CPU cannot run skip (brgemm for bf16 needs AMX; avx512* need AVX-512)."""
    if not _kernel_runs(kernel, dt):
        pytest.skip(f"kernel {kernel!r} cannot run {dt} on this CPU")
    cases = [(1, 64, 1000, None, None), (17, 97, 3001, 37, None), (70, 576, 5000, None, 30.0), (5, 96, 130, 65, 10.0)]
    cases += [(130, 33, 3001, None, None), (200, 96, 700, 300, 10.0), (130, 2049, 300, None, None)]
    if kernel == "scalar":
        cases = cases[:4]  # slow by design; its loop has no shape classes
    for n_rows, d, n_vocab, subset, cap in cases:
        head = make_head(d, n_vocab, dt, norm, subset=subset, bias=subset is not None, softcap=cap, seed=n_rows + d)
        hidden = make_hidden(n_rows, head, dt)
        check_signals(_op_signals(hidden, head, norm, kernel, cap), hidden, head, STOP_RULE)


def test_native_kernel_choice_is_the_fast_one_this_cpu_has():
    """Where the CPU has AVX512-BF16 (this project's CI CPU: AMD EPYC, no AMX), bf16 heads run the
    vdpbf16ps kernel (or brgemm with AMX), fp16 heads the AVX-512 kernel: never the torch fallback
    and its fp32 copy of W. `backend.exit_head_cpu_kernel` names the choice and says why."""
    from adainfer_kernels.backend import exit_head_cpu_kernel

    if cpu_impl() != "native":
        pytest.skip("_C is not loaded")
    flags = _cpu_flags()
    bf16 = exit_head_cpu_kernel(torch.bfloat16)
    if "avx512_bf16" in flags:
        assert bf16.name in ("avx512bf16", "brgemm"), bf16
        assert exit_head_cpu_kernel(torch.float16).name == "avx512"
    if "avx512_bf16" in flags and not any(f.startswith("amx") for f in flags):
        assert bf16.name == "avx512bf16" and "AMX" in bf16.reason, bf16
        with pytest.raises(RuntimeError, match="no brgemm for BFloat16"):
            torch.ops.adainfer.exit_head_cpu_pack(torch.randn(130, 64).bfloat16())
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        choice = exit_head_cpu_kernel(dt)
        assert choice.name in ("brgemm", "avx512bf16", "avx512", "torch") and choice.reason


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_native_half_path_keeps_no_copy_of_the_full_head(dt):
    """The row-major kernels read the head's own tensor: no packed or fp32 copy is cached for a full
    head; a subset is gathered once, in the head's dtype."""
    dtype = DTYPES[dt]
    if not HAS_NATIVE[dtype] or (dtype == torch.bfloat16 and _kernel_runs("brgemm", dtype)):
        pytest.skip("the row-major kernels are not the choice here")
    clear_cache()
    head = make_head(64, 1000, dtype, "rms", seed=30)
    hidden = make_hidden(3, head, dtype)
    check_signals(exit_head(hidden, head, STOP_RULE), hidden, head, STOP_RULE)
    assert len(_PACKED) == 0 and len(exit_head_mod._TRANSPOSED) == 0
    sub = make_head(64, 1000, dtype, "rms", subset=37, seed=30)
    check_signals(exit_head(hidden, sub, STOP_RULE), hidden, sub, STOP_RULE)
    assert len(_PACKED) == 1 and len(exit_head_mod._TRANSPOSED) == 0
    (cached,) = [v for _, _, v in exit_head_mod._PACKED._entries.values()]
    assert cached.dtype == dtype and cached.shape == (37, 64)
    clear_cache()


@pytest.mark.parametrize("n_rows", [7, 200])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_native_results_do_not_depend_on_the_thread_count(dt, n_rows):
    """Tasks and their merge order depend on R only: 1 and 2 threads give bit-identical signals."""
    dtype = DTYPES[dt]
    if not HAS_NATIVE[dtype]:
        pytest.skip("the native op cannot run this dtype here")
    head = make_head(576, 20000, dtype, "rms", seed=31)
    hidden = make_hidden(n_rows, head, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend("native", hidden, head, STOP_RULE)
        torch.set_num_threads(max(2, threads))
        many = run_backend("native", hidden, head, STOP_RULE)
    finally:
        torch.set_num_threads(threads)
    for name in ("top_prob", "gap", "argmax", "score"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name


def test_native_op_refuses_kernels_it_cannot_run():
    """Never a silent fallback: a forced kernel that cannot run, an unknown kernel or a weight in the
    wrong layout is a clear error, and impl="native" raises where the op cannot run the dtype."""
    if cpu_impl() != "native":
        pytest.skip("_C is not loaded")
    ops = torch.ops.adainfer
    h16, w16 = torch.randn(3, 64).half(), torch.randn(130, 64).half()
    with pytest.raises(RuntimeError, match="kernel 'avx512bf16' cannot run Half"):
        ops.exit_head_cpu(h16, w16, 130, 0, None, None, 1e-5, None, None, "avx512bf16")
    with pytest.raises(RuntimeError, match="kernel 'scalar' cannot run Float"):
        ops.exit_head_cpu(h16.float(), w16.float(), 130, 0, None, None, 1e-5, None, None, "scalar")
    with pytest.raises(RuntimeError, match="kernel must be one of"):
        ops.exit_head_cpu(h16, w16, 130, 0, None, None, 1e-5, None, None, "amx")
    with pytest.raises(
        RuntimeError, match=r"takes the weight as it is stored: a contiguous Half tensor of shape \(130, 64\)"
    ):
        ops.exit_head_cpu(h16, w16[:, :32], 130, 0, None, None, 1e-5, None, None, "scalar")
    with pytest.raises(RuntimeError, match="takes the weight as it is stored"):
        ops.exit_head_cpu(h16, w16.t().contiguous().t(), 130, 0, None, None, 1e-5, None, None, "scalar")


def test_forcing_native_where_it_cannot_run_raises(monkeypatch):
    head = make_head(64, 1000, torch.bfloat16, "rms", seed=29)
    hidden = make_hidden(4, head, torch.bfloat16)
    monkeypatch.setattr(exit_head_mod, "_native_supports", lambda dtype: False)
    with pytest.raises(RuntimeError, match=r"native CPU exit head is unavailable for torch\.bfloat16"):
        _exit_head_cpu(hidden, head, None, impl="native")


def test_cpu_prepared_weight_cache_reuses_invalidates_and_dies_with_the_weight():
    if not HAS_NATIVE[torch.float32]:
        pytest.skip("the native CPU exit head is unavailable here")
    clear_cache()
    head = make_head(64, 1000, torch.float32, "rms", seed=9)
    hidden = make_hidden(4, head, torch.float32)
    first = exit_head(hidden, head)
    assert len(_PACKED) == 1
    packed = _PACKED.get((head.weight, None), lambda: pytest.fail("the packed weight was not reused"))
    exit_head(hidden, head)
    assert _PACKED.get((head.weight, None), lambda: None) is packed
    with torch.no_grad():
        head.weight.mul_(-1.0)  # in place: a new version, the cache must not serve the old panels
    second = exit_head(hidden, head)
    check_signals(second, hidden, head, None)
    assert not torch.equal(first.argmax, second.argmax)
    del head, first, second, packed
    gc.collect()
    assert len(_PACKED) == 0


# ---- every backend: ties, a single candidate, non-finite rows, empty input ----


def _tie_head(dtype: torch.dtype, n_vocab: int, tied: tuple[int, ...], subset=None) -> tuple[ReadoutHead, torch.Tensor]:
    """Integer weights and hidden states: every logit is an exact small integer in any dtype."""
    g = torch.Generator().manual_seed(10)
    d = 64
    w = torch.randint(-1, 2, (n_vocab, d), generator=g).float()
    w[:, 4:] = 0
    for p in tied:
        w[p, :4] = 3.0  # logit 3 * (1 + 2 + 3 + 1) = 21 > any other (<= 7)
    hidden = torch.zeros(2, d)
    hidden[:, :4] = torch.tensor([1.0, 2.0, 3.0, 1.0])
    head = ReadoutHead(weight=w.to(dtype), norm="none", vocab_subset=subset)
    return head, hidden.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_exact_ties_pick_the_lower_position_with_gap_zero(backend, dt, monkeypatch):
    dtype = DTYPES[dt]
    # The torch fallback's chunks: 1024 candidates, so that ties also straddle chunks.
    monkeypatch.setattr(exit_head_mod, "_chunk", lambda n_rows: 1024)
    # Tied maxima in one tile (5, 6); in one split / CPU task / chunk but different tiles or panels
    # (5, 200); in different splits / tasks / chunks (4500, 5); three-way (4999, 2048, 77).
    for tied in ((5, 6), (200, 5), (4500, 5), (4999, 2048, 77)):
        head, hidden = _tie_head(dtype, 5000, tied)
        got = run_backend(backend, hidden, head, STOP_RULE)
        assert got.argmax.tolist() == [min(tied)] * 2, f"{backend} {tied}: {got.argmax.tolist()}"
        assert got.gap.tolist() == [0.0, 0.0], f"{backend} {tied}: gap {got.gap.tolist()}"
        ref = exit_head_ref(hidden, head, STOP_RULE)
        torch.testing.assert_close(got.top_prob, ref.top_prob, rtol=1e-5, atol=1e-6)
    # With a subset the lower subset position wins (id 4500 is listed before id 5).
    head, hidden = _tie_head(dtype, 5000, (5, 4500), subset=torch.tensor([9, 4500, 77, 5, 1000]))
    got = run_backend(backend, hidden, head, STOP_RULE)
    assert got.argmax.tolist() == [4500, 4500] and got.gap.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_candidate_gives_gap_equal_to_top_prob(backend):
    head = make_head(64, 1000, torch.float32, "rms", seed=11)
    head = ReadoutHead(**{**head.__dict__, "vocab_subset": torch.tensor([321]), "logit_bias": torch.tensor([0.5])})
    hidden = make_hidden(3, head, torch.float32)
    got = run_backend(backend, hidden, head, STOP_RULE)
    assert got.top_prob.tolist() == [1.0] * 3 and got.gap.tolist() == [1.0] * 3
    assert got.argmax.tolist() == [321] * 3
    torch.testing.assert_close(got.score, torch.full((3,), 1.5 - 2.0 + 0.25))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_get_nan_signals_and_argmax_minus_one(backend):
    head = make_head(64, 1000, torch.bfloat16, "rms", seed=12)
    hidden = make_hidden(6, head, torch.bfloat16)
    hidden[1, 3] = float("nan")
    hidden[2, 0] = float("inf")
    hidden[4, 63] = float("-inf")
    got = run_backend(backend, hidden, head, STOP_RULE)
    bad = [1, 2, 4]
    assert got.argmax[bad].tolist() == [-1, -1, -1]
    for t in (got.top_prob, got.gap, got.score):
        assert torch.isnan(t[bad]).all() and not torch.isnan(t[[0, 3, 5]]).any()
    good = [0, 3, 5]
    want = exit_head_ref(hidden[good], head, STOP_RULE)
    torch.testing.assert_close(got.top_prob[good], want.top_prob, rtol=0, atol=2e-2)
    assert (got.argmax[good] >= 0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_all_candidates_at_minus_inf_give_nan(backend):
    head = make_head(64, 1000, torch.float32, "none", subset=3, seed=13)
    head = ReadoutHead(**{**head.__dict__, "logit_bias": torch.full((3,), float("-inf"))})
    got = run_backend(backend, make_hidden(2, head, torch.float32), head, STOP_RULE)
    assert torch.isnan(got.top_prob).all() and torch.isnan(got.gap).all() and torch.isnan(got.score).all()


@pytest.mark.parametrize("backend", ["splitv", "rowtile", "public"])
def test_empty_rows_return_empty_signals(backend):
    head = make_head(64, 1000, torch.float16, "layer", seed=14)
    hidden = torch.empty(0, 64, dtype=torch.float16)
    got = exit_head(hidden, head, STOP_RULE) if backend == "public" else run_backend(backend, hidden, head, STOP_RULE)
    assert len(got) == 0 and got.score is not None and got.score.shape == (0,)
    assert got.argmax.dtype == torch.int64 and got.top_prob.dtype == torch.float32
    assert exit_head(hidden, head).score is None


@pytest.mark.parametrize("backend", ["splitv", "rowtile", *CPU_IMPLS])
def test_strided_hidden(backend):
    head = make_head(64, 1000, torch.float32, "rms", seed=15)
    g = torch.Generator().manual_seed(16)
    h3 = torch.randn(5, 7, 64, generator=g)
    last = h3[:, -1]  # the layer loop's view: row stride 7 * 64
    transposed = torch.randn(64, 5, generator=g).t()  # unit stride along rows, not along d
    for hidden in (last, transposed):
        got = run_backend(backend, hidden, head, STOP_RULE)
        want = run_backend(backend, hidden.contiguous(), head, STOP_RULE)
        torch.testing.assert_close(got.top_prob, want.top_prob, rtol=0, atol=1e-6)
        assert torch.equal(got.argmax, want.argmax)


# ---- Gemma / Gemma2: the rms_offset norm and final-logit soft-capping, on every backend ----

# (norm, logit_softcap, logit_scale, subset, logit bias). The logit scales put the top logits well
# into the cap's curved part (e.g. 27 capped vs 46 uncapped at cap 30) while top_prob stays 0.3-0.9,
# so the tolerance rule is not dominated by its atol.
GEMMA_CASES = {
    "gemma": ("rms_offset", None, 4.0, None, False),
    "gemma2": ("rms_offset", 30.0, 10.0, None, False),
    "gemma2_logit_bias": ("rms_offset", 30.0, 12.0, 37, True),
    "layer_softcap_subset": ("layer", 15.0, 6.0, 300, False),
    "rms_softcap_logit_bias": ("rms", 10.0, 4.0, 37, True),
}


def _gemma_head(case: str, dtype: torch.dtype, d: int = 64, n_vocab: int = 3001, seed: int = 21) -> ReadoutHead:
    norm, cap, scale, subset, bias = GEMMA_CASES[case]
    return make_head(d, n_vocab, dtype, norm, subset=subset, bias=bias, logit_scale=scale, softcap=cap, seed=seed)


@pytest.mark.parametrize("case", sorted(GEMMA_CASES))
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["splitv", "rowtile", *CPU_IMPLS])
def test_gemma_norm_and_softcap_match_reference(backend, dt, case):
    """Every real backend against the fp64 (fp32 inputs) / fp32 (bf16, fp16 inputs) reference, 2x-PyTorch
    rule, argmax exact off near-ties; 4 rows for splitv (one row block), 17 for the others. (The reference
    is not a backend here: against itself the bf16/fp16 items could not fail.)"""
    dtype = DTYPES[dt]
    head = _gemma_head(case, dtype)
    hidden = make_hidden(4 if backend == "splitv" else 17, head, dtype, seed=22)
    check_signals(run_backend(backend, hidden, head, STOP_RULE), hidden, head, STOP_RULE)


@pytest.mark.parametrize("backend", ["splitv", "rowtile", *CPU_IMPLS])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_gemma_paths_reproduce_hf_rounding_and_fp32_softcap(backend, dt):
    """Gemma's norm rounded exactly as HF rounds it, fp32 logits, the cap applied to them: within 2e-5 of
    that computation in fp64, far tighter than the 2x-PyTorch rule (HF's own bf16 caps bf16 logits)."""
    dtype = DTYPES[dt]
    head = _gemma_head("gemma2_logit_bias", dtype, seed=23)
    hidden = make_hidden(5, head, dtype, seed=24)
    got = run_backend(backend, hidden, head, STOP_RULE)
    want = hf_numerics_signals(hidden, head, STOP_RULE)
    for name in ("top_prob", "gap", "score"):
        err = (getattr(got, name) - getattr(want, name)).abs().max().item()
        assert err <= 2e-5, f"{backend} {name}: max err {err:.3e} vs the HF-rounded fp32-logit reference"
    assert torch.equal(got.argmax, want.argmax)


@pytest.mark.parametrize("backend", ["splitv", "rowtile", *CPU_IMPLS])
def test_softcap_changes_the_signals(backend):
    """The cap is really applied: the same head without it gives very different probabilities."""
    head = _gemma_head("gemma2", torch.float32)
    hidden = make_hidden(4, head, torch.float32, seed=22)
    capped = run_backend(backend, hidden, head, STOP_RULE)
    plain = run_backend(backend, hidden, ReadoutHead(**{**head.__dict__, "logit_softcap": None}), STOP_RULE)
    assert (capped.top_prob - plain.top_prob).abs().max().item() > 0.1
    check_signals(capped, hidden, head, STOP_RULE)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_cpu_gemma2_real_size(impl, dt):
    """SmolLM2-sized head (576, 49152) with Gemma's norm and Gemma2's cap of 30."""
    dtype = DTYPES[dt]
    head = make_head(576, 49152, dtype, "rms_offset", logit_scale=10.0, softcap=30.0, seed=576)
    hidden = make_hidden(8, head, dtype)
    check_signals(run_backend(impl, hidden, head, STOP_RULE), hidden, head, STOP_RULE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_softcap_saturation_ties_pick_the_lower_position(backend, dt, monkeypatch):
    """Logits 20 (position 5) and 21 (position 4500) both cap to exactly 1.0 at cap 1: a tie that the
    cap creates, so the lower position wins (not the uncapped argmax) and the gap is 0."""
    dtype = DTYPES[dt]
    monkeypatch.setattr(exit_head_mod, "_chunk", lambda n_rows: 1024)  # the tie straddles torch chunks
    head, hidden = _tie_head(dtype, 5000, (4500,))
    w = head.weight.clone()
    w[5, :4] = torch.tensor([3.0, 3.0, 3.0, 2.0], dtype=dtype)  # 3 + 6 + 9 + 2 = 20
    head = ReadoutHead(weight=w, norm="none", logit_softcap=1.0)
    got = run_backend(backend, hidden, head, STOP_RULE)
    assert got.argmax.tolist() == [5, 5], f"{backend}: {got.argmax.tolist()}"
    assert got.gap.tolist() == [0.0, 0.0], f"{backend}: gap {got.gap.tolist()}"
    ref = exit_head_ref(hidden, head, STOP_RULE)
    torch.testing.assert_close(got.top_prob, ref.top_prob, rtol=1e-5, atol=1e-6)
    uncapped = run_backend(backend, hidden, ReadoutHead(weight=w, norm="none"), STOP_RULE)
    assert uncapped.argmax.tolist() == [4500, 4500]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_non_finite_rows_get_nan_signals(backend):
    """Gemma's norm is applied before the kernels: the inf/NaN check still reads the caller's rows."""
    head = _gemma_head("gemma2", torch.bfloat16, seed=25)
    hidden = make_hidden(6, head, torch.bfloat16)
    hidden[1, 3] = float("nan")
    hidden[4, 63] = float("-inf")
    got = run_backend(backend, hidden, head, STOP_RULE)
    assert got.argmax[[1, 4]].tolist() == [-1, -1]
    for t in (got.top_prob, got.gap, got.score):
        assert torch.isnan(t[[1, 4]]).all() and not torch.isnan(t[[0, 2, 3, 5]]).any()
    assert (got.argmax[[0, 2, 3, 5]] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_values_through_two_candidates(backend):
    """Logits (y, 0) capped at 1 and 0.5, y across both branches of the kernels' tanh: top_prob is
    sigmoid(|z|) and the gap tanh(|z| / 2) of z = cap * tanh(y / cap), to 3e-7 (measured here: <= 9e-8 on
    every backend). A 1e-4 error in one tanh coefficient moves them by ~2e-6."""
    d = 64
    y = torch.linspace(-3.0, 3.0, 601)
    hidden = torch.zeros(601, d)
    hidden[:, 0] = y
    w = torch.zeros(2, d)
    w[0, 0] = 1.0
    for cap in (1.0, 0.5):
        got = run_backend(backend, hidden, ReadoutHead(weight=w, norm="none", logit_softcap=cap), None)
        z = (cap * torch.tanh(y.double() / cap)).abs()
        err_top = (got.top_prob.double() - 1.0 / (1.0 + torch.exp(-z))).abs().max().item()
        err_gap = (got.gap.double() - torch.tanh(z / 2)).abs().max().item()
        assert max(err_top, err_gap) <= 3e-7, f"cap {cap}: max err top_prob {err_top:.2e}, gap {err_gap:.2e}"
        assert torch.equal(got.argmax, (y < 0).long())  # y = 0 is a tie: position 0


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, _tanh(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


def test_triton_tanh_matches_fp64():
    """The kernels' tanh (Cephes tanhf, also in csrc/exit_head_cpu_rowstats.h) on a dense grid, both
    branches, tiny, huge and infinite arguments: relative error <= 3e-7 against fp64."""
    grid = torch.linspace(-12.0, 12.0, 48001)
    tiny = torch.logspace(-30, 0, 3001)
    special = torch.tensor([0.0, -0.0, 0.625, -0.625, 0.62499994, 1e30, -1e30, float("inf"), float("-inf")])
    x = torch.cat([grid, tiny, -tiny, special]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs().clamp(min=1e-300)).nan_to_num(0.0)
    worst = int(rel.argmax())
    assert rel.max().item() <= 3e-7, f"max rel err {rel.max().item():.3e} at x = {x[worst].item()!r}"
    nonzero = x != 0
    assert torch.equal(torch.signbit(y[nonzero]), torch.signbit(x[nonzero])), "tanh is odd: the sign follows x"
    assert (y[~nonzero] == 0).all()


# The bit-for-bit and model-level checks import transformers (tests only; adainfer_kernels never does).


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_rms_offset_is_bit_identical_to_hf_gemma_rmsnorm(family, dt):
    if family == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as Norm
    else:
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as Norm
    from adainfer_kernels.head import decode_rows
    from adainfer_kernels.reference import apply_norm_ref

    dtype = DTYPES[dt]
    d = 96
    g = torch.Generator().manual_seed(26)
    norm = Norm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g) * 0.5)  # trained Gemma weights sit around 0 (scale 1 + w)
    norm = norm.to(dtype)
    x = (torch.randn(33, d, generator=g) * (1 + 20 * torch.rand(33, 1, generator=g)) + 0.3).to(dtype)
    with torch.no_grad():
        want = norm(x)
        head = ReadoutHead(
            weight=torch.zeros(10, d, dtype=dtype), norm="rms_offset", norm_weight=norm.weight.detach(), eps=norm.eps
        )
        for name, got in (("decode_rows", decode_rows(x, head)), ("apply_norm_ref", apply_norm_ref(x, head))):
            assert got.dtype == want.dtype
            diff = (got.float() - want.float()).abs()
            assert torch.equal(got, want), f"{name}: {int((diff > 0).sum())} elements differ, max {diff.max():.3e}"


def _tiny_gemma(family: str):
    """A tiny random Gemma / Gemma2 (fp32, eager), its final norm's input at the last position and its
    own last-position logits. The tied embedding is scaled so that the logits reach the cap's curve."""
    import transformers

    torch.manual_seed(27)
    kw = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        attn_implementation="eager",
    )
    if family == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**kw))
    else:
        cfg = transformers.Gemma2Config(**kw, final_logit_softcapping=10.0, sliding_window=8)
        model = transformers.Gemma2ForCausalLM(cfg)
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        model.model.norm.weight.normal_(0.0, 0.3)
    seen = {}
    hook = model.model.norm.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    ids = torch.randint(0, 1000, (6, 9), generator=torch.Generator().manual_seed(28))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        hook.remove()
    return model, seen["h"][:, -1].contiguous(), logits


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_exit_head_reproduces_a_gemma_models_own_decode(family):
    """The ReadoutHead of a real (tiny, random) Gemma / Gemma2: the reference's logits are the model's own
    (norm, tied LM head, Gemma2's soft-cap), and every backend's signals are those of the model's logits."""
    from adainfer_kernels.reference import head_logits_ref, signals_from_logits

    model, hidden, logits = _tiny_gemma(family)
    cfg = model.config
    head = ReadoutHead(
        weight=model.lm_head.weight.detach(),
        norm="rms_offset",
        norm_weight=model.model.norm.weight.detach(),
        eps=cfg.rms_norm_eps,
        logit_softcap=getattr(cfg, "final_logit_softcapping", None),
    )
    assert (head.logit_softcap is not None) == (family == "gemma2")
    if head.logit_softcap is not None:
        assert logits.abs().max() > 0.6 * head.logit_softcap  # the cap bends the top logits
    with torch.no_grad():
        torch.testing.assert_close(head_logits_ref(hidden, head), logits, rtol=1e-5, atol=1e-5)
    top, gap, pos = signals_from_logits(logits)
    for backend in ("splitv", "rowtile", *CPU_IMPLS):
        got = run_backend(backend, hidden, head, None)
        assert torch.equal(got.argmax, pos), f"{backend}: {got.argmax.tolist()} vs the model's {pos.tolist()}"
        torch.testing.assert_close(got.top_prob, top, rtol=0, atol=2e-5, msg=f"{backend} top_prob")
        torch.testing.assert_close(got.gap, gap, rtol=0, atol=2e-5, msg=f"{backend} gap")


# ---- the public entry point ----


def test_public_exit_head_on_cpu_uses_the_cpu_path_and_inference_mode(monkeypatch):
    seen = {}
    real = exit_head_mod._exit_head_cpu

    def spy(hidden, head, stop_rule=None, impl="auto"):
        seen["inference"] = torch.is_inference_mode_enabled()
        return real(hidden, head, stop_rule, impl)

    monkeypatch.setattr(exit_head_mod, "_exit_head_cpu", spy)
    head = make_head(64, 1000, torch.float32, "rms", seed=17)
    hidden = make_hidden(4, head, torch.float32)
    got = exit_head(hidden, head, STOP_RULE)
    assert seen == {"inference": True}
    check_signals(got, hidden, head, STOP_RULE)


def test_forced_reference_backend(monkeypatch):
    calls = []
    monkeypatch.setenv("ADAINFER_BACKEND", "reference")
    monkeypatch.setattr(exit_head_mod, "exit_head_ref", lambda *a: calls.append(1) or exit_head_ref(*a))
    head = make_head(64, 1000, torch.float32, "rms", seed=18)
    exit_head(make_hidden(2, head, torch.float32), head)
    assert calls == [1]


def test_importing_the_package_does_not_import_triton():
    code = "import sys, adainfer_kernels; from adainfer_kernels import exit_head; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_check_helper_can_fail():
    """The tolerance rule is not vacuous: a 1e-3 error in top_prob or a wrong argmax is caught."""
    head = make_head(64, 1000, torch.float32, "rms", seed=19)
    hidden = make_hidden(4, head, torch.float32)
    good = exit_head(hidden, head, STOP_RULE)
    check_signals(good, hidden, head, STOP_RULE)
    off = ExitSignals(good.top_prob + 1e-3, good.gap, good.argmax, good.score)
    with pytest.raises(AssertionError, match="top_prob: max err"):
        check_signals(off, hidden, head, STOP_RULE)
    wrong = ExitSignals(good.top_prob, good.gap, (good.argmax + 1) % 1000, good.score)
    with pytest.raises(AssertionError, match="argmax differs"):
        check_signals(wrong, hidden, head, STOP_RULE)


# ---- bad input: a clear error before any work, on every entry point ----


def _base() -> tuple[torch.Tensor, ReadoutHead]:
    head = make_head(64, 100, torch.float32, "rms", seed=20)
    return make_hidden(3, head, torch.float32), head


def _with(head: ReadoutHead, **kw) -> ReadoutHead:
    return ReadoutHead(**{**head.__dict__, **kw})


BAD_INPUTS = {
    "hidden_1d": (lambda h, hd: (h[0], hd, None), ValueError, "must be 2-D"),
    "hidden_3d": (lambda h, hd: (h[None], hd, None), ValueError, "must be 2-D"),
    "hidden_int": (lambda h, hd: (h.long(), hd, None), TypeError, "bf16, fp16 or fp32"),
    "hidden_not_tensor": (lambda h, hd: (h.tolist(), hd, None), TypeError, "torch.Tensor"),
    "head_not_exithead": (lambda h, hd: (h, hd.weight, None), TypeError, "ReadoutHead"),
    "d_mismatch": (lambda h, hd: (h[:, :32], hd, None), ValueError, "d=32 but the head takes d=64"),
    "weight_dtype": (lambda h, hd: (h, _with(hd, weight=hd.weight.half()), None), TypeError, "one dtype"),
    "norm_weight_dtype": (lambda h, hd: (h, _with(hd, norm_weight=hd.norm_weight.double()), None), TypeError, "dtype"),
    "weight_1d": (lambda h, hd: (h, _with(hd, weight=hd.weight[0]), None), ValueError, "2-D"),
    "weight_empty": (lambda h, hd: (h, _with(hd, weight=hd.weight[:0]), None), ValueError, "empty"),
    "weight_device": (lambda h, hd: (h, _with(hd, weight=hd.weight.to("meta")), None), ValueError, "one device"),
    "norm_unknown": (lambda h, hd: (h, _with(hd, norm="batch"), None), ValueError, "not supported"),
    "norm_weight_missing": (lambda h, hd: (h, _with(hd, norm_weight=None), None), ValueError, "needs norm_weight"),
    "norm_weight_shape": (lambda h, hd: (h, _with(hd, norm_weight=hd.norm_weight[:10]), None), ValueError, "shape"),
    "rms_with_bias": (lambda h, hd: (h, _with(hd, norm_bias=hd.norm_weight), None), ValueError, "only used with"),
    "none_with_weight": (lambda h, hd: (h, _with(hd, norm="none"), None), ValueError, "takes no norm_weight"),
    "eps_negative": (lambda h, hd: (h, _with(hd, eps=-1e-5), None), ValueError, "eps"),
    "eps_nan": (lambda h, hd: (h, _with(hd, eps=float("nan")), None), ValueError, "eps"),
    "project_out_shape": (
        lambda h, hd: (h, _with(hd, project_out=torch.randn(32, 64)), None),
        ValueError,
        "project_out must be",
    ),
    "subset_out_of_range": (
        lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([3, 100])), None),
        IndexError,
        r"\[0, 100\)",
    ),
    "subset_negative": (lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([-1, 3])), None), IndexError, "lie in"),
    "subset_duplicate": (
        lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([3, 7, 3])), None),
        ValueError,
        "distinct",
    ),
    "subset_float": (lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([3.0])), None), TypeError, "int64"),
    "subset_2d": (lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([[3]])), None), TypeError, "1-D"),
    "subset_empty": (
        lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([], dtype=torch.int64)), None),
        ValueError,
        "empty",
    ),
    "bias_without_subset": (
        lambda h, hd: (h, _with(hd, logit_bias=torch.zeros(3)), None),
        ValueError,
        "needs a vocab_subset",
    ),
    "bias_shape": (
        lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([1, 2]), logit_bias=torch.zeros(3)), None),
        ValueError,
        r"shape \(2,\)",
    ),
    "bias_dtype": (
        lambda h, hd: (h, _with(hd, vocab_subset=torch.tensor([1, 2]), logit_bias=torch.zeros(2).half()), None),
        TypeError,
        "fp32",
    ),
    "softcap_zero": (lambda h, hd: (h, _with(hd, logit_softcap=0.0), None), ValueError, "logit_softcap"),
    "softcap_negative": (lambda h, hd: (h, _with(hd, logit_softcap=-30.0), None), ValueError, "finite float > 0"),
    "softcap_nan": (lambda h, hd: (h, _with(hd, logit_softcap=float("nan")), None), ValueError, "logit_softcap"),
    "softcap_inf": (lambda h, hd: (h, _with(hd, logit_softcap=float("inf")), None), ValueError, "logit_softcap"),
    "softcap_fp32_subnormal": (lambda h, hd: (h, _with(hd, logit_softcap=1e-40), None), ValueError, "logit_softcap"),
    "softcap_bool": (lambda h, hd: (h, _with(hd, logit_softcap=True), None), ValueError, "logit_softcap"),
    "softcap_str": (lambda h, hd: (h, _with(hd, logit_softcap="30"), None), ValueError, "logit_softcap"),
    "softcap_tensor": (
        lambda h, hd: (h, _with(hd, logit_softcap=torch.tensor(30.0)), None),
        ValueError,
        "logit_softcap",
    ),
    "rms_offset_weight_missing": (
        lambda h, hd: (h, _with(hd, norm="rms_offset", norm_weight=None), None),
        ValueError,
        "needs norm_weight",
    ),
    "rms_offset_with_bias": (
        lambda h, hd: (h, _with(hd, norm="rms_offset", norm_bias=hd.norm_weight), None),
        ValueError,
        "only used with",
    ),
    "stop_rule_type": (lambda h, hd: (h, hd, (1.0, 2.0, 0.0)), TypeError, "StopRule"),
    "stop_rule_nan": (lambda h, hd: (h, hd, StopRule(float("nan"), 1.0, 0.0)), ValueError, "finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("entry", ["public", "triton"])
def test_bad_input_raises_a_clear_error(case, entry):
    make_args, exc, match = BAD_INPUTS[case]
    hidden, head = _base()
    args = make_args(hidden, head)
    fn = exit_head if entry == "public" else exit_head_triton
    with pytest.raises(exc, match=match):
        fn(*args)


def test_inputs_requiring_grad_are_refused_only_while_autograd_records():
    hidden, head = _base()
    head = _with(head, weight=torch.nn.Parameter(head.weight.clone()))  # like a HF model's weight
    with pytest.raises(RuntimeError, match=r"inference-only.*head\.weight"):
        exit_head(hidden, head)
    with pytest.raises(RuntimeError, match="hidden"):
        exit_head(hidden.clone().requires_grad_(), _base()[1])
    with torch.no_grad():
        check_signals(exit_head(hidden, head), hidden, _with(head, weight=head.weight.detach()), None)
