"""`adainfer demo --quick` on the bundled real model (offline): the whole main job, small splits."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_prints_the_table_and_writes_results(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "adainfer.app.cli", "demo", "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LlamaForCausalLM: 30 layers, hidden 576, vocab 49152" in out.stdout
    for header in ("full acc", "AdaInfer acc", "agree", "pruning", "oracle", "FLOPs saved", "wall clock"):
        assert header in out.stdout, out.stdout
    assert "svm + bias" in out.stdout and "probe svm + bias" in out.stdout and "gap, raw" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    (main_row,) = [r for r in results["rows"] if r["variant"]["main"]]
    assert main_row["variant"]["name"].endswith(" + bias (chosen)")  # the rule calibrate chooses
    # The main row's wall clock is measured on the real runtime (the other variants are simulated only).
    m = main_row["metrics"]
    assert m["wallclock_prompts"] == 16 and m["wallclock_full_s"] > 0 and m["wallclock_adainfer_s"] > 0
    assert m["speedup"] == pytest.approx(m["wallclock_full_s"] / m["wallclock_adainfer_s"])
    # ... and its accuracy is read through the runtime on the whole test split, beside the simulation.
    assert m["runtime_prompts"] == 16 and "through the runtime" in out.stdout
    _check_runtime_metrics_are_consistent(m, n_layers=30)
    assert all(r["metrics"]["speedup"] is None for r in results["rows"] if not r["variant"]["main"])
    for png in ("exit_layers.png", "accuracy_vs_savings.png", "per_layer.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def _check_runtime_metrics_are_consistent(m: dict, n_layers: int) -> None:
    """Relations that hold between the runtime's and the simulation's metrics on the same n prompts."""
    n = m["runtime_prompts"]
    for key in ("runtime_accuracy", "runtime_agreement", "runtime_matches_simulation", "runtime_exit_match"):
        assert abs(m[key] * n - round(m[key] * n)) < 1e-9, f"{key} = {m[key]} is not a count of {n} prompts"
    # Answers differ from the simulated ones on a share 1 - runtime_matches_simulation of the prompts, so
    # accuracy and agreement with the full model differ by at most that share.
    mismatch = 1.0 - m["runtime_matches_simulation"]
    assert abs(m["runtime_accuracy"] - m["adainfer_accuracy"]) <= mismatch + 1e-9, m
    assert abs(m["runtime_agreement"] - m["agreement"]) <= mismatch + 1e-9, m
    # Exit layers differ on a share 1 - runtime_exit_match, each by at most L - 1 layers.
    bound = (1.0 - m["runtime_exit_match"]) * (n_layers - 1) / n_layers
    assert abs(m["runtime_pruning_ratio"] - m["pruning_ratio"]) <= bound + 1e-9, m
