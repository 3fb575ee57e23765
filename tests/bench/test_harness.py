"""bench/harness.py: the interleaved timer, the quantiles and the CSV record every benchmark uses."""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import harness
from harness import ENV_COLUMNS, Timing, append_rows, interleaved, output_dir, time_fn


def test_quantiles_are_median_p20_p80_and_min():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0]
    t = Timing.of(samples)
    q = statistics.quantiles(sorted(samples), n=5)
    assert (t.median, t.p20, t.p80, t.min) == (4.0, q[0], q[3], 1.0)
    assert t.p20 <= t.median <= t.p80


def test_few_samples_give_their_range():
    t = Timing.of([3.0, 1.0, 2.0])
    assert (t.median, t.p20, t.p80, t.min) == (2.0, 1.0, 3.0, 1.0)
    with pytest.raises(ValueError):
        Timing.of([])


def test_timing_columns_plain_and_per_provider():
    t = Timing(median=1.23456, p20=1.0, p80=2.0, min=0.5)
    assert t.columns(digits=2) == {"median_ms": 1.23, "p20_ms": 1.0, "p80_ms": 2.0}
    assert t.columns(provider="native") == {"native_ms": 1.23456, "native_p20_ms": 1.0, "native_p80_ms": 2.0}


def test_interleaved_excludes_warmup_and_rotates_the_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = interleaved(fns, reps=3, warmup=2, device="cpu")
    assert list(out) == ["a", "b", "c"]
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"], "warm-up calls first, each function's in a row"
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"], "round r starts at function r"
    assert all(isinstance(t, Timing) and t.median >= 0 for t in out.values())


def test_self_timed_samples_are_the_returned_seconds():
    seconds = iter([9.0, 0.002, 0.001, 0.003])  # the first call is the warm-up
    out = interleaved({"step": lambda: next(seconds)}, reps=3, warmup=1, self_timed=True)["step"]
    assert out.median == pytest.approx(2.0) and out.min == pytest.approx(1.0) and out.p80 == pytest.approx(3.0)


def test_time_fn_cold_flushes_before_each_sample(monkeypatch):
    flushes = []
    monkeypatch.setattr(harness, "flush_caches", lambda device: flushes.append(device))
    time_fn(lambda: None, warmup=2, reps=4, device="cpu", cold=True)
    assert flushes == ["cpu"] * 4


def test_rows_go_to_scratch_unless_recorded(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAINFER_BENCH_DIR", raising=False)
    assert output_dir(record=False) == harness.SCRATCH_DIR
    assert output_dir(record=True) == harness.RESULTS_DIR
    assert harness.SCRATCH_DIR.parts[-2:] == ("build", "bench")
    monkeypatch.setenv("ADAINFER_BENCH_DIR", str(tmp_path))
    assert output_dir(record=True) == output_dir(record=False) == tmp_path


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_append_rows_writes_the_environment_first_and_never_drops_a_column(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAINFER_BENCH_DIR", str(tmp_path))
    path = append_rows("demo", [{"bench": "x", "provider": "a", "median_ms": 1.5}])
    header, rows = _read(path)
    assert tuple(header[: len(ENV_COLUMNS)]) == ENV_COLUMNS
    assert header[len(ENV_COLUMNS) :] == ["bench", "provider", "median_ms"]
    assert rows[0]["torch"] == torch.__version__ and rows[0]["median_ms"] == "1.5"

    append_rows("demo", [{"bench": "x", "provider": "b", "median_ms": 2.0}])  # same columns: appended
    # a new column rewrites the file with it added; the older rows keep their values, blank in it
    append_rows("demo", [{"bench": "x", "provider": "c", "median_ms": 3.0, "p20_ms": 2.5}])
    header, rows = _read(path)
    assert header[-1] == "p20_ms"
    assert [(r["provider"], r["median_ms"], r["p20_ms"]) for r in rows] == [
        ("a", "1.5", ""),
        ("b", "2.0", ""),
        ("c", "3.0", "2.5"),
    ]


def test_dtype_names():
    assert harness.dtype_name(torch.bfloat16) == "bf16" and harness.dtype_name(torch.float32) == "fp32"
    assert harness.dtype_name(torch.int8) == "int8"
