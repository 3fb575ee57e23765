"""`adainfer demo --quick` on the bundled real model (offline): the whole main job, small splits."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_prints_the_table_and_writes_results(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "adainfer.app.cli", "demo", "--quick", "--out", str(tmp_path)],
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
    assert main_row["variant"]["name"] in ("svm + bias", "probe svm + bias")
    # The main row's wall clock is measured on the real runtime (the other variants are simulated only).
    m = main_row["metrics"]
    assert m["wallclock_prompts"] == 16 and m["speedup"] > 0 and 0.0 <= m["runtime_exit_match"] <= 1.0
    # ... and its accuracy is read through the runtime on the whole test split, beside the simulation.
    assert m["runtime_prompts"] == 16 and 0.0 <= m["runtime_accuracy"] <= 1.0
    assert 0.0 <= m["runtime_matches_simulation"] <= 1.0 and "through the runtime" in out.stdout
    assert all(r["metrics"]["speedup"] is None for r in results["rows"] if not r["variant"]["main"])
    for png in ("exit_layers.png", "accuracy_vs_savings.png", "per_layer.png"):
        assert (tmp_path / png).stat().st_size > 10_000
