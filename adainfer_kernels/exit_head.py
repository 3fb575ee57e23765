"""The fused exit head: norm -> LM head (-> soft-cap) -> softmax statistics -> top-2 gap -> linear score.

``exit_head(hidden, head, stop_rule)`` decodes each row's hidden state through the model's own
final norm and LM head (the "logit lens") and returns, per row, the top-1 probability, the top-1
minus top-2 probability gap, the top-1 id and the stop rule's linear score, without ever holding
the (rows, V) logits (docs/architecture.md, "The exit head"). Backends (``backend.exit_head_backend``):

- CUDA tensors: the Triton kernels of ``exit_head_triton`` (split-V + merge; row-tiled ``tl.dot``).
- CPU tensors: ``adainfer::exit_head_cpu`` from ``_C`` (csrc/exit_head_cpu.cpp): the norm in
  C++, then per task of consecutive candidates a GEMM tile into an L2-sized fp32 buffer reduced on
  the spot (top-2 + sum-exp), tasks in parallel, merged in order. The GEMM kernel depends on the
  weight's dtype and the CPU (``backend.exit_head_cpu_kernel``, shown by ``adainfer info``):
  ``brgemm`` for fp32 heads (oneDNN's batch-reduce GEMM, AVX-512, on W^T packed once in 64-column
  panels) and for bf16 heads on AMX CPUs; without AMX, bf16 heads run ``avx512bf16``
  (csrc/exit_head_cpu_dot.cpp: W read as stored, row-major bf16, no copy; vdpbf16ps with fp32
  accumulation; dot-product tiles of 6 rows x 4 candidates at few rows, and from 128 rows
  blocks of 64 candidates transposed on the fly into a per-thread L2 scratch), or
  ``avx512`` (each W vector widened to fp32 in registers, fp32 FMA) on AVX-512 CPUs without
  AVX512-BF16; fp16 heads run ``avx512`` (vcvtph2ps). On CPUs without AVX-512 the op's portable
  ``scalar`` kernel is slower than the torch fallback, which is then the choice.
  The torch fallback (no ``_C``, no brgemm for fp32, no AVX-512 for bf16 / fp16) walks the
  vocabulary in chunks with ``torch.mm`` on a cached fp32 W^T and merges the same statistics:
  also O(R x chunk) working memory.
- ``ADAINFER_BACKEND=reference``: ``reference.exit_head_ref`` (materialises the logits; debugging).

Gemma / Gemma2 (``ReadoutHead.norm = "rms_offset"``, ``ReadoutHead.logit_softcap``): Gemma's RMSNorm
(fp32 throughout, times ``1 + weight``, one rounding) is applied by ``head.decode_rows`` with
Hugging Face's own ops, on (R, d) rows, and the kernels get pre-normed rows (as for
``project_out``), so it is bit-identical to ``GemmaRMSNorm`` on every backend. Soft-capping,
``z_c = cap * tanh(<x, W_c> / cap)`` before the logit bias, runs inside every backend's vocabulary
pass on the fp32 logits (Triton: in registers; native CPU op: on its L2-sized logits buffer,
vectorised; torch fallback: on each chunk), never on (R, V) logits. tanh is monotone, so the
argmax and the top-2 order are those of the uncapped logits up to ties that the cap's fp32
rounding creates (the ties rule applies to the capped values); the sum-exp runs over the capped
values. The fused paths cap fp32 logits, whereas Hugging Face's bf16 Gemma2 caps bf16 logits
(rounded before and after the tanh): the fused head is again the closer one to the fp32 reference.

Dtype policy (every backend): the model's dtype in, fp32 statistics out. The norm rounds where
Hugging Face rounds (Llama: fp32 statistics, cast to the input dtype, then the weight, cast; OPT:
LayerNorm in fp32, cast once); its statistics are fp32 (Triton) or double (CPU) sums, so an element
can differ from HF's in its last bit where a statistic does (tests bound the effect). Then x @ W^T
is accumulated in fp32 from exact products of the model-dtype values: bf16 weights go to the
AMX / vdpbf16ps / tensor-core paths as they are (vdpbf16ps flushes bf16 subnormals, below 1e-38,
to zero: no effect on logits of real heads); fp16 and fp32 weights are multiplied in fp32 (fp16 ->
fp32 is exact, done in registers by the CPU kernels). The order of the fp32 sums is fixed by R and
the kernel, never by the thread count. The logits are never rounded to the model dtype (Hugging
Face's own bf16 LM head rounds them to 8 bits of mantissa), so the fused head is closer to the fp32
reference than the model's own low-precision decode. Weights are never converted to a narrower
dtype: a bf16 copy of an fp32 LM head would run up to ~4x faster on AMX (docs/architecture.md,
"Measured facts") but, measured on (576, 49152) with logits of standard deviation 4-8, moves
top_prob by up to 5e-3-1e-2 and the gap by up to 2e-2 (and flipped 1 argmax in 64 rows), against
1e-6-5e-6 for PyTorch's own fp32 path: far outside the fp32 tolerance (<= 2x PyTorch's own fp32
error + 1e-5), and enough to move a classifier's decisions.

Cached prepared weight (CPU): the brgemm kernel packs W (or W[subset]) into its panel layout on
the first call for a head (measured here: 0.1 s for (49152, 576), 0.4-0.7 s for (32000, 4096)) and
keeps it while the weight tensor lives (an entry dies with its tensor; ``clear_cache()`` drops
all): a second copy of W, e.g. 113 MB for SmolLM2's fp32 head. The row-major kernels (bf16 / fp16
heads without AMX) keep nothing for a full head: they read the model's own tensor; a vocabulary
subset is gathered once into a cached (K, d) copy in the head's dtype. Their per-call memory is
per-thread scratch: a 256 KiB logits buffer, plus 128 x d bytes of transposed W at many rows
(0.7 MB in all for (576, 49152) on 2 threads, 1.2% of its bf16 W). The torch fallback keeps an
fp32 W^T instead (2x for bf16/fp16 heads): converting W on every call made it slower than the
unfused reference.

``project_out`` (OPT-350m) is applied before the vocabulary pass, on (R, d) rows, with Hugging
Face's ops: folding it into W would make the streamed matrix (V, d) instead of (V, d_out) (2x the
bytes for OPT-350m) and change the rounding; projecting first reads the (d_out, d) matrix once.

Ties: the lowest candidate position wins (the lower id; with a subset, the earlier subset entry)
and the gap is 0. A single candidate gives gap == top_prob. Rows whose hidden state holds inf or
NaN get NaN top_prob / gap / score and argmax -1; if every candidate logit is -inf (a logit bias
of -inf everywhere) top_prob / gap / score are NaN.
"""

from __future__ import annotations

import torch

from adainfer_kernels import _native
from adainfer_kernels._cache import IdentityCache
from adainfer_kernels.backend import exit_head_backend, exit_head_cpu_kernel
from adainfer_kernels.head import (
    ExitSignals,
    ReadoutHead,
    StopRule,
    check_exit_head_inputs,
    decode_rows,
    empty_signals,
    kernel_rows,
)
from adainfer_kernels.reference import exit_head_ref

__all__ = ["clear_cache", "exit_head"]

CPU_IMPLS = ("auto", "native", "torch")

# Prepared LM-head weights of the CPU path, keyed by (weight, vocab_subset) identity and version:
# the native op's packed panels, and the torch fallback's transposed fp32 copy.
_PACKED = IdentityCache(max_entries=4)
_TRANSPOSED = IdentityCache(max_entries=4)


def exit_head(hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None = None) -> ExitSignals:
    """Exit signals of each row: top-1 probability, top-1 minus top-2 gap, top-1 id, score.

    Args:
        hidden: (R, d) bf16/fp16/fp32 hidden states (the last token of each active row), on the
            device and in the dtype of the head's tensors. R may be 0.
        head: the model's decode path (``ReadoutHead``: norm, ``project_out``, LM head, subset).
        stop_rule: optional ``StopRule`` (the linear decision function); its value, the score, is
            computed in the same pass.

    Returns:
        ``ExitSignals`` with (R,) fields: ``top_prob`` fp32 = max softmax probability over the
        candidates, ``gap`` fp32 = top-1 minus top-2 probability, ``argmax`` int64 id in the full
        vocabulary, ``score`` fp32 (None without a ``stop_rule``). Computed under
        ``torch.inference_mode()``: the outputs are inference tensors.

    Raises:
        TypeError, ValueError, IndexError, RuntimeError: bad input (see ``check_exit_head_inputs``),
            always before any work is done.
    """
    # Checked in the caller's grad mode: refusing inputs that would need a backward.
    check_exit_head_inputs(hidden, head, stop_rule)
    with torch.inference_mode():
        if hidden.shape[0] == 0:
            return empty_signals(hidden.device, stop_rule is not None)
        choice = exit_head_backend(hidden.device).name
        if choice == "triton":
            from adainfer_kernels.exit_head_triton import exit_head_triton

            return exit_head_triton(hidden, head, stop_rule, check=False)
        if choice == "cpu":
            return _exit_head_cpu(hidden, head, stop_rule)
        return exit_head_ref(hidden, head, stop_rule)


def clear_cache() -> None:
    """Drop the CPU path's prepared LM-head weights (they are also dropped with their tensors)."""
    _PACKED.clear()
    _TRANSPOSED.clear()


# ---- CPU path ----


def cpu_impl() -> str:
    """``"native"`` when ``_C`` provides the fused CPU op for this machine, else ``"torch"``."""
    return "native" if _native.has_op("exit_head_cpu") else "torch"


def _native_supports(dtype: torch.dtype) -> bool:
    """Whether the native op runs LM heads of ``dtype`` here (with any kernel, the slow portable one included)."""
    return cpu_impl() == "native" and bool(torch.ops.adainfer.exit_head_cpu_supported(dtype))


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # The torch fallback's rows: bf16 x bf16 products are exact in fp32, fp16 -> fp32 is exact.
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def _exit_head_cpu(
    hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None = None, impl: str = "auto"
) -> ExitSignals:
    """The CPU path (inputs already checked). ``impl`` forces ``"native"`` or ``"torch"`` (tests, bench).

    ``"auto"`` takes the kernel ``backend.exit_head_cpu_kernel`` names (``adainfer info`` shows it
    and why); ``"native"`` raises where the op cannot run this dtype, never falling back silently.
    """
    impl, kernel = _resolve_cpu_impl(head.weight.dtype, impl)
    if impl == "torch":
        return _finish(*_torch_stats(hidden, head)[:4], hidden, head, stop_rule)
    rows, args = _native_args(hidden, head, kernel)
    top, gap, pos = torch.ops.adainfer.exit_head_cpu(*args)
    if rows is not hidden:  # non-finite rows of the caller's hidden states, not of the normed/projected rows
        bad = ~torch.isfinite(hidden).all(dim=1)
        top = torch.where(bad, float("nan"), top)
        gap = torch.where(bad, float("nan"), gap)
        pos = torch.where(bad, -1, pos)
    argmax = pos if head.vocab_subset is None else torch.where(pos < 0, pos, head.vocab_subset[pos.clamp(min=0)])
    value = stop_rule(top, gap) if stop_rule is not None else None
    return ExitSignals(top_prob=top, gap=gap, argmax=argmax.to(torch.int64), score=value)


def _resolve_cpu_impl(wdt: torch.dtype, impl: str) -> tuple[str, str | None]:
    """(``"native"`` or ``"torch"``, the native op's kernel or None) for an LM head of dtype ``wdt``."""
    if impl not in CPU_IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {CPU_IMPLS}")
    kernel = None  # the native op's kernel, when the op runs
    if impl == "auto":
        kernel = exit_head_cpu_kernel(wdt).name
        impl = "torch" if kernel == "torch" else "native"
    elif impl == "native":
        if not _native_supports(wdt):
            why = _native.error() or exit_head_cpu_kernel(wdt).reason
            raise RuntimeError(f"the native CPU exit head is unavailable for {wdt} here ({why})")
        kernel = str(torch.ops.adainfer.exit_head_cpu_kernel(wdt))
    return impl, kernel


def _native_args(hidden: torch.Tensor, head: ReadoutHead, kernel: str | None) -> tuple[torch.Tensor, tuple]:
    """(rows fed to the op, the arguments of ``exit_head_cpu`` / ``exit_head_cpu_stats``)."""
    if kernel == "brgemm":  # fp32 heads, and bf16 heads on AMX CPUs: W^T in packed panels, cached
        w = _PACKED.get((head.weight, head.vocab_subset), lambda: _pack(head, _compute_dtype(head.weight.dtype)))
    else:  # the row-major kernels read W as it is stored; a subset is gathered once (cached)
        w = _rowmajor(head)
    # The op applies rms / layer norms itself (HF's numerics); Gemma's norm and project_out come pre-applied.
    rows, norm = kernel_rows(hidden, head)
    nw, nb = (head.norm_weight, head.norm_bias) if norm else (None, None)
    cap = float(head.logit_softcap) if head.logit_softcap is not None else None
    return rows, (rows, w, head.n_candidates, norm, nw, nb, float(head.eps), head.logit_bias, cap, kernel)


def _torch_stats(hidden: torch.Tensor, head: ReadoutHead) -> tuple[torch.Tensor, ...]:
    """``_stats_torch`` of the head's candidates (rows normed / projected with Hugging Face's ops)."""
    x = decode_rows(hidden, head).to(_compute_dtype(head.weight.dtype))
    wt = _TRANSPOSED.get((head.weight, head.vocab_subset), lambda: _transposed_fp32(head))
    return _stats_torch(x, wt, head.logit_bias, head.logit_softcap)


def cpu_stats(hidden: torch.Tensor, head: ReadoutHead, impl: str = "auto") -> tuple[torch.Tensor, ...]:
    """Raw per-row statistics of the CPU path over the head's candidates (inputs already checked).

    Returns (max, sum, pos, second, second_pos), each (R,): fp32 M = max z, fp32 S = sum exp(z - M),
    int64 candidate position of M (lowest on ties), fp32 T = second largest z (a tie counts twice),
    int64 lowest position of T other than pos (-1 when T = -inf). Rows of ``hidden`` holding inf/NaN:
    M, S, T NaN and both positions -1. ``impl`` as ``_exit_head_cpu``; the native path is
    ``adainfer::exit_head_cpu_stats``, whose statistics ``exit_head_cpu`` finishes into signals.
    """
    requested = impl
    impl, kernel = _resolve_cpu_impl(head.weight.dtype, impl)
    if impl == "native" and not _native.has_op("exit_head_cpu_stats"):
        if requested == "native":
            raise RuntimeError("adainfer_kernels._C predates exit_head_cpu_stats: rebuild it (pip install -e .)")
        impl = "torch"
    if impl == "torch":
        big_m, big_s, pos, second, second_pos = _torch_stats(hidden, head)
    else:
        _, args = _native_args(hidden, head, kernel)
        big_m, big_s, pos, second, second_pos = torch.ops.adainfer.exit_head_cpu_stats(*args)
    # The caller's rows decide (the op saw normed / projected rows when decode_rows ran first).
    bad = ~torch.isfinite(hidden).all(dim=1)
    nan = torch.tensor(float("nan"))
    second_pos = torch.where(bad | (second == float("-inf")), -1, second_pos)
    pos = torch.where(bad, -1, pos)
    return torch.where(bad, nan, big_m), torch.where(bad, nan, big_s), pos, torch.where(bad, nan, second), second_pos


def _pack(head: ReadoutHead, cdt: torch.dtype) -> torch.Tensor:
    w = head.weight if head.vocab_subset is None else head.weight.index_select(0, head.vocab_subset)
    return torch.ops.adainfer.exit_head_cpu_pack(w.to(cdt))


def _rowmajor(head: ReadoutHead) -> torch.Tensor:
    """W (or W[subset]) as the row-major kernels take it: (n_candidates, d), contiguous, own dtype.
    The full head is passed as it is (no copy); a subset or a non-contiguous head is copied once and
    cached (the cache must not hold the head's own tensor: its entry would keep the weight alive)."""
    w = head.weight
    if head.vocab_subset is None and w.is_contiguous():
        return w
    return _PACKED.get(
        (w, head.vocab_subset), lambda: (w if head.vocab_subset is None else w[head.vocab_subset]).contiguous()
    )


def _chunk(n_rows: int) -> int:
    # (R, chunk) fp32 logits of about 1 MiB: large enough to amortise per-op overhead, small
    # enough for L2, and never (R, V).
    return max(1024, min(16384, (1 << 18) // max(1, n_rows)))


def _transposed_fp32(head: ReadoutHead) -> torch.Tensor:
    w = head.weight if head.vocab_subset is None else head.weight.index_select(0, head.vocab_subset)
    return w.float().t().contiguous()


def _stats_torch(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, softcap: float | None = None
) -> tuple[torch.Tensor, ...]:
    """The torch fallback: (max, sumexp, pos, second, second_pos) per row over the candidates in chunks.

    ``wt`` is the (d, K) fp32 transposed (subset) head; ``softcap`` caps each chunk's fp32 logits
    (``cap * tanh(z / cap)``) before the bias. Same statistics and tie rule as the native op:
    within a chunk ``max`` returns the first position of the maximum; across chunks a later chunk
    wins only with a strictly larger max. ``second_pos`` (the position of the second, lowest on
    ties; meaningless while second is -inf) comes with the second's ``max`` at no extra pass.
    """
    n_rows, n_cand = x.shape[0], wt.shape[1]
    xf = x.float()
    big_m = torch.full((n_rows,), float("-inf"))
    big_s = torch.zeros(n_rows)
    big_p = torch.zeros(n_rows, dtype=torch.int64)
    big_t = torch.full((n_rows,), float("-inf"))
    big_j = torch.full((n_rows,), -1, dtype=torch.int64)
    step = _chunk(n_rows)
    for c0 in range(0, n_cand, step):
        c1 = min(n_cand, c0 + step)
        z = xf @ wt[:, c0:c1]  # fp32 products of the model-dtype values, fp32 logits
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        if bias is not None:
            z += bias[c0:c1]
        c_max, c_pos = z.max(dim=1)
        finite = c_max > float("-inf")
        safe = torch.where(finite, c_max, torch.zeros_like(c_max))
        c_sum = torch.where(finite, torch.exp(z - safe[:, None]).sum(dim=1), torch.zeros_like(c_max))
        z.scatter_(1, c_pos[:, None], float("-inf"))
        if z.shape[1] > 1:
            c_sec, c_spos = z.max(dim=1)
        else:
            c_sec, c_spos = torch.full_like(c_max, float("-inf")), torch.zeros_like(c_pos)
        c_pos += c0
        c_spos += c0
        take = c_max > big_m
        # The second's position: on equal values the running (lower) position stays.
        big_j = torch.where(take, torch.where(big_m >= c_sec, big_p, c_spos), torch.where(c_max > big_t, c_pos, big_j))
        new_m = torch.maximum(big_m, c_max)
        safe_new = torch.where(new_m > float("-inf"), new_m, torch.zeros_like(new_m))
        big_s = big_s * torch.exp(big_m - safe_new) + c_sum * torch.exp(c_max - safe_new)
        big_t = torch.where(take, torch.maximum(big_m, c_sec), torch.maximum(big_t, c_max))
        big_p = torch.where(take, c_pos, big_p)
        big_m = new_m
    return big_m, big_s, big_p, big_t, big_j


def _finish(
    big_m: torch.Tensor,
    big_s: torch.Tensor,
    pos: torch.Tensor,
    second: torch.Tensor,
    hidden: torch.Tensor,
    head: ReadoutHead,
    stop_rule: StopRule | None,
) -> ExitSignals:
    """Signals from per-row (max, sum of exp(z - max), position of the max, second largest)."""
    top = 1.0 / big_s
    gap = top - torch.exp(second - big_m) / big_s
    bad = ~torch.isfinite(hidden).all(dim=1)
    undefined = bad | (big_m == float("-inf"))
    nan = torch.tensor(float("nan"))
    top = torch.where(undefined, nan, top)
    gap = torch.where(undefined, nan, gap)
    argmax = pos if head.vocab_subset is None else head.vocab_subset.to(torch.int64)[pos]
    argmax = torch.where(bad, torch.full_like(argmax, -1), argmax)
    value = stop_rule(top, gap) if stop_rule is not None else None
    return ExitSignals(top_prob=top, gap=gap, argmax=argmax, score=value)


def _register_fakes() -> None:
    """Shape-only (fake) kernels of the CPU ops, for torch.compile tracing and opcheck."""
    if not _native.has_op("exit_head_cpu") or getattr(_register_fakes, "done", False):
        return
    _register_fakes.done = True

    @torch.library.register_fake("adainfer::exit_head_cpu_pack")
    def _pack_fake(weight: torch.Tensor) -> torch.Tensor:
        n, d = weight.shape
        kp = (d + 1) // 2 * 2 if weight.dtype == torch.bfloat16 else d
        return weight.new_empty(((n + 63) // 64, kp * 64))

    @torch.library.register_fake("adainfer::exit_head_cpu")
    def _cpu_fake(
        hidden: torch.Tensor,
        packed: torch.Tensor,
        n_cand: int,
        norm: int,
        norm_weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        eps: float,
        bias: torch.Tensor | None,
        softcap: float | None = None,
        kernel: str | None = None,
    ) -> tuple[torch.Tensor, ...]:
        r = hidden.shape[0]
        f = hidden.new_empty((r,), dtype=torch.float32)
        return f, f.clone(), hidden.new_empty((r,), dtype=torch.int64)

    if not _native.has_op("exit_head_cpu_stats"):  # an extension built before the op existed
        return

    @torch.library.register_fake("adainfer::exit_head_cpu_stats")
    def _stats_fake(
        hidden: torch.Tensor,
        packed: torch.Tensor,
        n_cand: int,
        norm: int,
        norm_weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        eps: float,
        bias: torch.Tensor | None,
        softcap: float | None = None,
        kernel: str | None = None,
    ) -> tuple[torch.Tensor, ...]:
        r = hidden.shape[0]
        f = lambda dt: hidden.new_empty((r,), dtype=dt)
        return f(torch.float32), f(torch.float32), f(torch.int64), f(torch.float32), f(torch.int64)


_register_fakes()
