"""The demo pipeline's presentation: the summary lines state measured figures only."""

from __future__ import annotations

from adainfer.app.pipeline import NOT_MEASURED, summary_lines


def _metrics(**edits):
    m = {
        "full_accuracy": 0.9,
        "adainfer_accuracy": 0.88,
        "agreement": 0.97,
        "pruning_ratio": 0.3,
        "savings_vs_oracle": 0.75,
        "oracle_pruning_ratio": 0.4,
        "runtime_accuracy": None,
        "speedup": 1.3,
        "ideal_speedup": 1.4,
        "speedup_vs_ideal": 0.93,
        "wallclock_prompts": 96,
    }
    m.update(edits)
    return {"metrics": m}


def test_summary_lines_state_the_measured_figures_and_no_targets():
    lines = summary_lines(_metrics(), budget=0.01)
    text = "\n".join(lines)
    assert lines[0] == "accuracy: AdaInfer 0.880 vs full 0.900 (-2.0 points)"
    assert "disagreement with the full model on test: 0.030 (budget 0.010" in text
    assert "pruning ratio 0.300 = 75% of the oracle's 0.400" in text
    assert "wall clock: 1.30x vs ideal 1.40x (93% of ideal), 96 prompts" in text
    for word in ("target", "met", "missed"):
        assert word not in text.replace("measured", ""), text
    unmeasured = summary_lines(_metrics(speedup=None, savings_vs_oracle=None), budget=0.01)
    assert unmeasured[-1] == f"wall clock: {NOT_MEASURED} (--wallclock-prompts 0)"
    assert not any(line.startswith("layer savings") for line in unmeasured)
