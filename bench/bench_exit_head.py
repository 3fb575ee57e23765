"""Exit-head microbenchmark: the fused head beside the unfused torch path and the bare LM-head GEMM.

For each (d, V), dtype and row count R, side by side in one run (providers interleaved round-robin
so that load on a shared machine hits all alike):

    reference   the unfused torch path in the model's dtype: norm -> x @ W^T -> softmax -> top-2
                (``exit_head_ref(upcast=False)``, what a naive check costs)
    gemm        the bare LM-head GEMM x @ W^T of the model ((R, d) x (d, V)), the floor of any
                decode that reads W; ``gemm_t`` the same with W^T stored contiguous
    fused       ``exit_head`` (CPU: the native op with the kernel ``adainfer info`` names for the
                dtype, in the ``impl`` column: brgemm for fp32, avx512bf16 / avx512 for bf16 / fp16
                on AVX-512 CPUs without AMX; CUDA: the Triton kernels)
    copy_w      CPU only: ``dst.copy_(src)`` of a buffer of W's bytes, the memory floor: W bytes /
                copy bandwidth (bytes copied per second), timed in the same rounds as the others
    fused_torch CPU only: the chunked torch fallback used when ``_C`` lacks the op (first shape
                only unless ``--fallback all``: it keeps an fp32 W^T, 2 GB for (4096, 128256))
    fused_nocap with ``--softcap CAP`` (Gemma2: 30): ``exit_head`` on the same head without the cap,
                so that the cost of soft-capping is a ratio measured in the same run; the rows'
                ``op`` names the norm and the cap (``exit_head[rms_offset softcap=30]``)

Reported: median ms (p20, p80, min), GB/s of W streamed (W's bytes / time), ratios vs reference
and vs the faster GEMM from the medians and (starred) from the fastest runs, ``/ floor`` (time /
copy_w's), peak extra memory (tensor allocations seen by the profiler on CPU, by the caching
allocator on CUDA), and on CPU the fused path's memory that the profiler does not see:
``scratch_mb``, the native op's per-thread buffers (not tensors: the logits buffer, <= 1 MiB for
brgemm, <= 256 KiB for the row-major kernels, plus 128 x d bytes of packed W for the bf16 kernel
at many rows), and ``held_mb``, the prepared weight cached per head (brgemm's packed W^T panels:
a second copy of W; 0 for the row-major kernels, which read W as stored). On CUDA the fraction
of the HBM roofline (``--hbm-gbs``, 4300 for an H200). Timing through ``harness``: on the CPU
interleaved wall times (two warm-up calls each); on CUDA GPU times from ``harness.device_time``
(``triton.testing.do_bench``, L2 flushed between runs) plus the wall time per call from Python,
launches included.

Targets: CPU fused within 1.2x of the bare GEMM and >= 2x faster than the reference at R >= 8 on
(576, 49152) in fp32; in bf16 >= 1.5x faster than the reference at every R and within 1.3x of the
bare bf16 GEMM; GPU >= 85% of HBM roofline at R <= 64 and >= 1.5x the reference at R = 256.

    python bench/bench_exit_head.py [--quick] [--reps N] [--shapes 576x49152,4096x32000] [--dtypes fp32,bf16,fp16]
                                    [--norm rms_offset] [--softcap 30]

Defaults: (576, 49152) and (4096, 32000), fp32 / bf16 / fp16, R = 1, 8, 64, 256; (4096, 128256)
with ``--shapes``.

A full run appends its rows to bench/results/bench_exit_head.csv; ``--quick`` writes build/bench/
(``harness.output_dir``), ``--no-record`` writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import DTYPES, Timing, append_rows, device_time, interleaved, wall_ms_per_call

from adainfer_kernels import ReadoutHead, StopRule, exit_head
from adainfer_kernels.backend import exit_head_cpu_kernel
from adainfer_kernels.exit_head import _exit_head_cpu
from adainfer_kernels.reference import exit_head_ref

STOP_RULE = StopRule(w_top_prob=1.0, w_gap=2.0, offset=-1.5)
FULL_SHAPES = [(576, 49152), (4096, 32000)]
ROWS = [1, 8, 64, 256]


def make_case(
    d: int, n_vocab: int, dtype: torch.dtype, device: str, norm: str = "rms", softcap: float | None = None
) -> ReadoutHead:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n_vocab, d, generator=g) * (4.0 / math.sqrt(d))).to(dtype)
    # Unit scale either way: Gemma's rms_offset multiplies by 1 + weight.
    nw = (torch.zeros if norm == "rms_offset" else torch.ones)(d, dtype=dtype, device=device)
    return ReadoutHead(weight=w.to(device), norm=norm, norm_weight=nw, eps=1e-5, logit_softcap=softcap)


def op_label(head: ReadoutHead) -> str:
    if head.norm == "rms" and head.logit_softcap is None:
        return "exit_head"
    cap = "" if head.logit_softcap is None else f" softcap={head.logit_softcap:g}"
    return f"exit_head[{head.norm}{cap}]"


def providers(head: ReadoutHead, hidden: torch.Tensor, fallback: bool = True) -> dict[str, Callable[[], object]]:
    w = head.weight
    x = hidden
    out: dict[str, Callable[[], object]] = {
        "reference": lambda: exit_head_ref(hidden, head, STOP_RULE, upcast=False),
        "gemm": lambda: x @ w.t(),
    }
    if hidden.device.type == "cpu":
        wt = w.t().contiguous()
        out["gemm_t"] = lambda: x @ wt
        out["fused"] = lambda: exit_head(hidden, head, STOP_RULE)
        src = torch.empty(w.numel() * w.element_size(), dtype=torch.uint8)
        dst = torch.empty_like(src)
        out["copy_w"] = lambda: dst.copy_(src)
        if fallback:
            out["fused_torch"] = lambda: _exit_head_cpu(hidden, head, STOP_RULE, impl="torch")
    else:
        out["fused"] = lambda: exit_head(hidden, head, STOP_RULE)
    if head.logit_softcap is not None:
        plain = ReadoutHead(**{**head.__dict__, "logit_softcap": None})
        out["fused_nocap"] = lambda: exit_head(hidden, plain, STOP_RULE)
    return out


def _peak_extra_cpu(fn: Callable[[], object]) -> float:
    """Peak bytes of CPU tensor allocations during one call, from the profiler's memory events
    (each op's own allocations at its start, frees when they happen)."""
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler writes progress lines to stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    deltas = []
    for e in prof.events():
        if e.name == "[memory]":
            deltas.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            deltas.append((e.time_range.start, e.self_cpu_memory_usage))
    cur = peak = 0
    for _, delta in sorted(deltas):
        cur += delta
        peak = max(peak, cur)
    return float(peak)


def _peak_extra_cuda(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _cpu_memory_columns(head: ReadoutHead, n_rows: int) -> dict[str, float]:
    """The fused CPU path's memory that the profiler does not see (module docstring), in MiB."""
    kernel = exit_head_cpu_kernel(head.weight.dtype).name
    d = head.weight.shape[1]
    threads = torch.get_num_threads()
    if kernel == "brgemm":
        per_thread = 1 << 20
        held = head.weight.numel() * (4 if head.weight.dtype != torch.bfloat16 else 2)
    elif kernel == "torch":
        per_thread = 0
        held = head.weight.numel() * 4  # the fallback's fp32 W^T
    else:
        per_thread = (256 << 10) + (128 * d if kernel == "avx512bf16" and n_rows >= 64 else 0)
        held = 0
    return {"scratch_mb": round(threads * per_thread / 2**20, 2), "held_mb": round(held / 2**20, 1)}


def bench_case(
    d: int,
    n_vocab: int,
    dt: str,
    n_rows: int,
    device: str,
    reps: int,
    hbm_gbs: float,
    fallback: bool,
    norm: str = "rms",
    softcap: float | None = None,
) -> list[dict]:
    dtype = DTYPES[dt]
    key = (d, n_vocab, dt, device, norm, softcap)
    head = _HEADS.get(key) or _HEADS.setdefault(key, make_case(d, n_vocab, dtype, device, norm, softcap))
    g = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(n_rows, d, generator=g).to(dtype).to(device)
    fns = providers(head, hidden, fallback)
    rows = []
    w_bytes = head.weight.numel() * head.weight.element_size()
    with torch.inference_mode():
        stats: dict[str, Timing]
        if device == "cpu":
            # two warm-up calls: the first packs the fused path's weight (and JITs, sizes the allocator)
            stats = interleaved(fns, reps, warmup=2, device=device)
            peaks = {k: _peak_extra_cpu(fn) for k, fn in fns.items()}
            wall = {}
        else:
            stats = {k: device_time(fn, reps) for k, fn in fns.items()}
            wall = {k: wall_ms_per_call(fn, reps, device) for k, fn in fns.items()}
            peaks = {k: _peak_extra_cuda(fn) for k, fn in fns.items()}
    floor = min(stats[k].median for k in ("gemm", "gemm_t") if k in stats)
    floor_min = min(stats[k].min for k in ("gemm", "gemm_t") if k in stats)
    copy = stats.get("copy_w")
    fused_impl = exit_head_cpu_kernel(dtype).name if device == "cpu" else "triton"
    for name, t in stats.items():
        med, best = t.median, t.min
        gbs = w_bytes / (med * 1e-3) / 1e9
        mem = _cpu_memory_columns(head, n_rows) if device == "cpu" and name in ("fused", "fused_nocap") else {}
        row = {
            "op": op_label(head),
            "provider": name,
            "impl": fused_impl if name in ("fused", "fused_nocap") else name,
            "dtype": dt,
            "d": d,
            "V": n_vocab,
            "R": n_rows,
            **t.columns(digits=4),
            "min_ms": round(best, 4),
            "wall_ms": round(wall[name], 4) if name in wall else "",
            "w_gbs": round(gbs, 1),
            "hbm_roofline_frac": round(gbs / hbm_gbs, 3) if device != "cpu" else "",
            "speedup_vs_reference": round(stats["reference"].median / med, 2),
            "ratio_vs_gemm_floor": round(med / floor, 2),
            # The same ratios from the fastest run of each: on a shared, loaded machine the least
            # disturbed runs compare the code, the medians also compare the load.
            "speedup_vs_reference_min": round(stats["reference"].min / best, 2),
            "ratio_vs_gemm_floor_min": round(best / floor_min, 2),
            "peak_extra_mb": round(peaks[name] / 2**20, 2),
            "w_mb": round(w_bytes / 2**20, 1),
            "floor_ms": round(copy.median, 4) if copy is not None else "",
            "copy_gbs": round(w_bytes / (copy.median * 1e-3) / 1e9, 1) if copy is not None else "",
            "ratio_vs_floor": round(med / copy.median, 2) if copy is not None else "",
            "scratch_mb": mem.get("scratch_mb", ""),
            "held_mb": mem.get("held_mb", ""),
        }
        rows.append(row)
    return rows


_HEADS: dict = {}


def print_table(rows: list[dict]) -> None:
    cols = [
        ("dtype", 5),
        ("d", 5),
        ("V", 7),
        ("R", 4),
        ("provider", 12),
        ("median_ms", 10),
        ("p20_ms", 9),
        ("p80_ms", 9),
        ("min_ms", 9),
        ("wall_ms", 9),
        ("w_gbs", 7),
        ("hbm_roofline_frac", 8),
        ("speedup_vs_reference", 8),
        ("ratio_vs_gemm_floor", 8),
        ("speedup_vs_reference_min", 8),
        ("ratio_vs_gemm_floor_min", 8),
        ("peak_extra_mb", 9),
        ("ratio_vs_floor", 8),
        ("scratch_mb", 8),
        ("held_mb", 8),
    ]
    head = ["dtype", "d", "V", "R", "provider", "ms", "p20", "p80", "min", "wall ms", "GB/s", "HBM"]
    head += ["x ref", "/ gemm", "x ref*", "/ gemm*", "+MB", "/ floor", "scratch", "held MB"]
    print("  ".join(h.rjust(w) for h, (_, w) in zip(head, cols, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in cols))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="(576, 49152) only, R in {1, 8, 64}, 5 reps; rows to build/bench"
    )
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--shapes", default=None, help="comma-separated dxV, e.g. 576x49152,4096x32000")
    p.add_argument("--dtypes", default=None, help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--rows", default=None, help="comma-separated row counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hbm-gbs", type=float, default=4300.0, help="HBM bandwidth ceiling (H200 ~4300 GB/s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--fallback",
        choices=("first", "all", "none"),
        default="first",
        help="time the CPU torch fallback on the first shape (default), every shape, or none",
    )
    p.add_argument("--norm", choices=("rms", "rms_offset"), default="rms", help="the head's norm (rms_offset: Gemma)")
    p.add_argument("--softcap", type=float, default=None, help="final-logit soft-cap (Gemma2: 30); adds fused_nocap")
    p.add_argument("--no-record", action="store_true", help="write no CSV")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    quick = args.quick or os.environ.get("ADAINFER_BENCH_QUICK", "0") == "1"
    shapes = FULL_SHAPES[:1] if quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows_list = [1, 8, 64] if quick else ROWS
    if args.rows:
        rows_list = [int(r) for r in args.rows.split(",")]
    reps = args.reps or (5 if quick else 7)
    out: list[dict] = []
    for d, n_vocab in shapes:
        # fp32: the bundled model's reference dtype; bf16: what a CPU user runs (2.1x faster than
        # fp32 for the bundled model on the AVX512-BF16 CPU); fp16: the other stored dtype.
        dts = args.dtypes.split(",") if args.dtypes else ["fp32", "bf16", "fp16"]
        for dt in dts:
            for n_rows in rows_list:
                fallback = args.fallback == "all" or (args.fallback == "first" and (d, n_vocab) == shapes[0])
                out += bench_case(
                    d, n_vocab, dt, n_rows, args.device, reps, args.hbm_gbs, fallback, args.norm, args.softcap
                )
            _HEADS.clear()
            print_table([r for r in out if r["d"] == d and r["V"] == n_vocab and r["dtype"] == dt])
            print(flush=True)
    if not args.no_record:
        path = append_rows("bench_exit_head", out, record=not quick)
        print(f"appended {len(out)} rows to {path}")
    return out


if __name__ == "__main__":
    main()
