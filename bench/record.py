"""Benchmark records: every figure is stored with the machine, versions, git sha and time.

Each benchmark prints its table and appends rows to ``bench/results/<name>.csv`` through
``append_rows`` (docs/architecture.md, "Benchmarks": a benchmark is a record). Ratios are measured side by side in one
run; absolute times count only on a GPU (the CPU machines here are shared and noisy).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Machine and versions for a record row."""
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
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_sha(),
        "device": device,
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
    }


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 3, reps: int = 20, device: str = "cpu") -> dict[str, float]:
    """Median / p20 / p80 milliseconds of ``fn()``, warm-up excluded, device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def append_rows(name: str, rows: list[dict[str, object]]) -> Path:
    """Append rows (plus the environment columns) to ``bench/results/<name>.csv``."""
    out_dir = Path(os.environ.get("ADAINFER_BENCH_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    env = environment()
    full = [{**env, **row} for row in rows]
    new = not path.exists()
    if new:
        # Columns: every key of every row, in first-seen order (rows may differ, e.g. optional fields).
        fields = list(dict.fromkeys(key for row in full for key in row)) if full else list(env)
    else:
        # Appending: keep the file's header, or later rows would land under the wrong columns.
        with path.open(newline="") as f:
            fields = next(csv.reader(f), None) or list(env)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        if new:
            writer.writeheader()
        writer.writerows(full)
    return path
