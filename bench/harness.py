"""The bench harness: one timer, one set of quantiles, one record format for every benchmark.

Timing (``interleaved``, ``time_fn``): the functions under comparison are sampled round-robin, one
call of each per round, the order rotated by one each round, so that the load of a shared machine
(it moves faster than one provider's whole run) hits every provider alike and none always runs
first after another's cache damage. Warm-up calls (packing, JIT, allocator, autotuning) are made
before and excluded; each sample is bracketed by a device synchronisation, so that a CUDA call is
timed to its end rather than to its launch. ``cold=True`` writes a buffer larger than the last-level
cache before each sample (for parts timed alone that, inside a model, find their weights evicted).
``self_timed=True`` takes each sample from the function's own return value (seconds), for calls
that time a phase inside themselves (a decode step stamped by a streamer).

Quantiles (``Timing``): median, p20 and p80 (``statistics.quantiles(n=5)``, exclusive method) and
the minimum, in milliseconds; with fewer than 5 samples p20 and p80 are the minimum and maximum.

Records (``append_rows``): one CSV per benchmark, ``<name>.csv``. Every row has, in this order:

    time, git, device, cpu_threads, torch, triton, transformers      (``ENV_COLUMNS``, ``environment``)
    what was measured: ``bench`` or ``op``, ``provider``, ``dtype``, and the benchmark's shape columns
    times in ms: ``median_ms, p20_ms, p80_ms`` (``Timing.columns()``); a row that holds several
    providers side by side names each one: ``<provider>_ms, <provider>_p20_ms, <provider>_p80_ms``
    derived figures (ratios, savings, GB/s) after them

A row with a column the file lacks rewrites the file with the new column added (older rows blank):
no column is ever dropped. Where rows go: ``$ADAINFER_BENCH_DIR`` when set; else ``bench/results/``
for an explicit full run of a script (``record=True``), ``build/bench/`` for quick runs (``pytest
bench``, ``make bench``, ``--quick``), so that short, noisy runs never land in the committed record.
Ratios are measured side by side in one run; absolute times count only on a GPU (the CPU machines
here are shared and noisy).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCRATCH_DIR = BENCH_DIR.parent / "build" / "bench"
ENV_COLUMNS = ("time", "git", "device", "cpu_threads", "torch", "triton", "transformers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FLUSH: dict[str, torch.Tensor] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names of the ``dtype`` column)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype).removeprefix("torch.")


# ---- timing ----


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. ``None``: CUDA if present."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def flush_caches(device: torch.device | str | None = None) -> None:
    """Write a buffer larger than the last-level cache: 256 MiB on the CPU, 2 GiB on a GPU (64 Mi and
    512 Mi fp32 elements)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = str(dev)
    buf = _FLUSH.get(key)
    if buf is None:
        buf = _FLUSH[key] = torch.empty((64 if dev.type == "cpu" else 512) * 2**20, device=dev)
    buf.fill_(1.0)
    sync(dev)


@dataclass(frozen=True)
class Timing:
    """Quantiles of one function's samples, in milliseconds."""

    median: float
    p20: float
    p80: float
    min: float

    @classmethod
    def of(cls, samples_ms: Iterable[float]) -> Timing:
        ts = sorted(samples_ms)
        if not ts:
            raise ValueError("no samples")
        if len(ts) >= 5:
            q = statistics.quantiles(ts, n=5)
            p20, p80 = q[0], q[3]
        else:  # too few for quantiles: the range of what was seen
            p20, p80 = ts[0], ts[-1]
        return cls(median=statistics.median(ts), p20=p20, p80=p80, min=ts[0])

    def columns(self, provider: str | None = None, digits: int | None = None) -> dict[str, float]:
        """``median_ms, p20_ms, p80_ms`` (or ``<provider>_ms, <provider>_p20_ms, <provider>_p80_ms``)."""
        med, p20, p80 = (v if digits is None else round(v, digits) for v in (self.median, self.p20, self.p80))
        if provider is None:
            return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
        return {f"{provider}_ms": med, f"{provider}_p20_ms": p20, f"{provider}_p80_ms": p80}


def _sample_ms(fn: Callable[[], object], device, self_timed: bool, cold: bool) -> float:
    if cold:
        flush_caches(device)
    if self_timed:
        return float(fn()) * 1e3
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    *,
    warmup: int = 1,
    device: torch.device | str | None = None,
    cold: bool = False,
    self_timed: bool = False,
) -> dict[str, Timing]:
    """Times every function ``reps`` times, round-robin (see the module docstring).

    Args:
        fns: name -> a callable of no arguments (its result is ignored unless ``self_timed``).
        reps: samples per function (rounds).
        warmup: calls of each function before timing, excluded.
        device: the device to synchronise around each sample (``None``: CUDA when present).
        cold: flush the last-level cache before each sample.
        self_timed: each call returns its own time in seconds; that is the sample.

    Returns:
        name -> ``Timing`` (ms), in the order of ``fns``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_sample_ms(fns[name], device, self_timed, cold))
    return {name: Timing.of(samples[name]) for name in names}


def time_fn(
    fn: Callable[[], object],
    warmup: int = 3,
    reps: int = 20,
    device: torch.device | str | None = None,
    cold: bool = False,
) -> Timing:
    """One function alone: ``interleaved`` with a single entry."""
    return interleaved({"fn": fn}, reps, warmup=warmup, device=device, cold=cold)["fn"]


def reps_for_budget(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    min_reps: int,
    max_reps: int,
    device: torch.device | str | None = None,
) -> int:
    """Rounds of ``interleaved`` that fit ``budget_s``, from one timed call of each function after
    two warm-up calls (which then count as that function's warm-up)."""
    probe_s = sum(time_fn(fn, warmup=2, reps=1, device=device).median / 1e3 for fn in fns.values())
    return int(max(min_reps, min(max_reps, budget_s / max(probe_s, 1e-6))))


def device_time(fn: Callable[[], object], reps: int) -> Timing:
    """GPU time of ``fn`` from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls,
    warm-up excluded): the kernel time without the Python launch cost."""
    import triton.testing

    p20, med, p80, best = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8, 0.0], rep=max(20, 10 * reps))
    return Timing(median=med, p20=p20, p80=p80, min=best)


def wall_ms_per_call(fn: Callable[[], object], reps: int, device: torch.device | str | None = None) -> float:
    """Mean wall ms per call of ``reps`` calls back to back, launches included, synchronised once
    at the end (what a Python caller waits for when it queues calls)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


# ---- records ----


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """The ``ENV_COLUMNS`` of a record row: UTC time, git sha, machine (GPU name, or ``cpu:<arch>``),
    torch's CPU threads, and the torch / triton / transformers versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "none"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu:{platform.processor() or 'x86_64'}"
    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_sha(),
        "device": device,
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
    }
    assert tuple(env) == ENV_COLUMNS
    return env


def output_dir(record: bool) -> Path:
    """``$ADAINFER_BENCH_DIR`` if set; else ``bench/results`` for a recorded run, ``build/bench`` otherwise."""
    env = os.environ.get("ADAINFER_BENCH_DIR")
    if env:
        return Path(env)
    return RESULTS_DIR if record else SCRATCH_DIR


def append_rows(name: str, rows: list[dict[str, object]], *, record: bool = False) -> Path:
    """Append ``rows`` (after the ``ENV_COLUMNS``) to ``<output_dir(record)>/<name>.csv``.

    ``record=True`` only for an explicit full run of a benchmark script: quick runs go to the scratch
    folder. A row with columns the file lacks rewrites the file with them added (older rows blank).
    """
    out_dir = output_dir(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    env = environment()
    full = [{**env, **row} for row in rows]
    fields = list(dict.fromkeys(key for row in full for key in row)) if full else list(env)
    if not path.exists():
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(full)
        return path
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        old = list(reader)
    merged = header + [key for key in fields if key not in header]
    if merged == header:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerows(full)
        return path
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=merged, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(full)
    tmp.replace(path)
    return path
