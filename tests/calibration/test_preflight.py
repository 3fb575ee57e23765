"""The pre-flight report: its figures from a calibrated classifier, the cost model's arithmetic, and
a verdict that says plainly when early exit will not pay."""

from __future__ import annotations

import pytest
from adainfer.calibration.fit import calibrate
from adainfer.calibration.preflight import MIN_SAVED, ForwardCost, Preflight, predicted_speedup, preflight


def test_speedup_of_rows_leaving_the_batch():
    cost = ForwardCost(fixed_s=0.1, per_row_s=0.01, batch_size=30)  # 0.1 + 0.3 s for the full batch
    assert predicted_speedup(cost, 1.0) == pytest.approx(1.0)
    assert predicted_speedup(cost, 0.5) == pytest.approx(0.4 / (0.1 + 0.15))
    assert predicted_speedup(ForwardCost(0.0, 0.01, 8), 0.25) == pytest.approx(4.0)  # no fixed cost: 1 / s
    with pytest.raises(ValueError, match="fraction of the layers"):
        predicted_speedup(cost, 1.5)


def test_report_of_a_calibrated_classifier(make_features):
    clf = calibrate(make_features(n=300, seed=1), make_features(n=400, seed=2), budget=0.02, confidence=0.9)
    cost = ForwardCost(fixed_s=0.05, per_row_s=0.02, batch_size=32)
    report = preflight(clf, cost)
    info = clf.info
    assert report.n_heldout == 400 == info["heldout_n"]
    assert report.certified_saved == pytest.approx(1 - info["heldout_mean_exit_layer"] / 12)
    assert report.oracle_saved == pytest.approx(1 - info["heldout_oracle_mean_exit_layer"] / 12)
    assert 0 < report.certified_saved <= report.oracle_saved  # the oracle bounds any rule on the same rows
    assert report.speedup == pytest.approx(predicted_speedup(cost, info["heldout_mean_exit_layer"] / 12))
    text = "\n".join(report.lines())
    assert "pre-flight (held-out split, 400 examples)" in text and "predicted wall clock at batch 32" in text
    assert report.to_dict()["verdict"] == report.verdict() and report.to_dict()["predicted_speedup"] == report.speedup
    assert preflight(clf).speedup is None and "predicted wall clock" not in "\n".join(preflight(clf).lines())


def test_verdicts_say_when_early_exit_will_not_pay():
    cost = ForwardCost(fixed_s=1.0, per_row_s=0.001, batch_size=8)  # fixed cost dominates: rows barely matter

    def report(saved, speedup=None, c=None):
        return Preflight(n_layers=30, n_heldout=900, oracle_saved=0.7, certified_saved=saved, speedup=speedup, cost=c)

    assert report(0.0).verdict().startswith("early exit will not pay here: no threshold fits")
    assert "skips only 5.0%" in report(0.05).verdict() and not report(MIN_SAVED / 2).worth_it
    slow = report(0.4, predicted_speedup(cost, 0.6), cost)
    assert "will not pay at batch 8" in slow.verdict() and not slow.worth_it
    assert report(0.4, 1.5, cost).verdict() == "worth it" and report(0.4).worth_it


def test_a_classifier_without_heldout_figures_is_refused(make_features):
    clf = calibrate(make_features(seed=1), None)
    with pytest.raises(ValueError, match="no held-out figures"):
        preflight(clf)
