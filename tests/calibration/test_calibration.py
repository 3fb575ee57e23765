"""The budgeted threshold, the exit simulation, the oracle, FLOPs and the calibrate/evaluate path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from adainfer.calibration.evaluate import METRIC_KEYS, evaluate, threshold_sweep
from adainfer.calibration.features import label_signals
from adainfer.calibration.fit import calibrate, choose_threshold
from adainfer.calibration.labelbias import estimate_label_bias
from adainfer.calibration.metrics import (
    clopper_pearson_upper,
    layer_flops,
    oracle_exit_layers,
    pruning_ratio,
    simulate_exits,
    take_at_exit,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def test_simulate_exits_on_hand_made_scores():
    scores = np.array(
        [
            [-1.0, 2.0, 3.0, -1.0],  # first checked layer with score > 0 is layer 2
            [5.0, -1.0, -1.0, -1.0],  # layer 1 not checked -> never before L
            [-1.0, -1.0, 0.0, 0.0],  # 0 is not > 0 -> L
            [np.nan, np.nan, 0.5, -1.0],  # NaN never stops -> layer 3
        ]
    )
    checked = np.array([False, True, True, True])
    assert simulate_exits(scores, checked).tolist() == [2, 4, 4, 3]
    assert simulate_exits(scores, np.zeros(4, bool)).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="checked"):
        simulate_exits(scores, np.ones(3, bool))


def test_oracle_on_hand_made_predictions():
    pred = np.array(
        [
            [1, 1, 1, 1, 1],  # always the final answer -> layer 1
            [0, 1, 1, 1, 1],  # settles at layer 2
            [1, 0, 1, 0, 1],  # only the last layer -> 5
            [1, 1, 0, 1, 1],  # flips back at layer 3 -> 4
            [7, 7, 3, 3, 3],  # any ids
        ]
    )
    assert oracle_exit_layers(pred).tolist() == [1, 2, 5, 4, 3]
    assert pruning_ratio(oracle_exit_layers(pred), 5) == pytest.approx(1 - 15 / 25)


def test_take_at_exit():
    values = np.arange(12).reshape(3, 4)
    assert take_at_exit(values, np.array([1, 4, 2])).tolist() == [0, 7, 9]


def _brute_force(decision, pred, budget, confidence=None):
    """Every (m, t) over all distinct thresholds, with the simple simulation. With a confidence,
    each m's thresholds are tested from the safest down and only those before the first failure
    count (fixed-sequence testing)."""
    n, n_layers = decision.shape
    best = (n * n_layers, None, n_layers)
    for m in range(1, n_layers):
        checked = np.zeros(n_layers, bool)
        checked[m - 1 : n_layers - 1] = True
        vals = np.unique(decision[:, m - 1 : n_layers - 1])
        for t in np.sort(np.r_[vals, vals.min() - 1.0])[::-1]:  # the safest (highest) threshold first
            exits = simulate_exits(decision - t, checked)
            dis = int((take_at_exit(pred, exits) != pred[:, -1]).sum())
            if exits.sum() == n * n_layers:
                continue  # nothing stops at this threshold: the "never" baseline, not a test
            ok = (
                dis <= np.floor(budget * n + 1e-9)
                if confidence is None
                else (clopper_pearson_upper(dis, n, confidence) <= budget)
            )
            if not ok and confidence is not None:
                break
            if ok and exits.sum() < best[0]:
                best = (int(exits.sum()), t, m)
    return best


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 25),
    n_layers=st.integers(2, 7),
    budget=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3]),
    with_confidence=st.booleans(),
)
def test_budgeted_threshold_never_exceeds_the_budget_and_is_optimal(data, n, n_layers, budget, with_confidence):
    # coarse values make ties between rows and layers common
    decision = data.draw(arrays(np.float64, (n, n_layers), elements=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])))
    pred = data.draw(arrays(np.int64, (n, n_layers), elements=st.integers(0, 2)))
    confidence = 0.9 if with_confidence else None
    choice = choose_threshold(decision, pred, budget, confidence=confidence)
    checked = np.zeros(n_layers, bool)
    if choice.threshold is not None:
        checked[choice.min_layer - 1 : n_layers - 1] = True
    # replay the choice with the plain simulation: the budget holds on this split
    exits = simulate_exits(decision - (choice.threshold if choice.threshold is not None else 0.0), checked)
    dis = int((take_at_exit(pred, exits) != pred[:, -1]).sum())
    assert dis == choice.n_disagree
    assert exits.mean() == pytest.approx(choice.mean_exit_layer)
    if choice.threshold is None:
        assert dis == 0  # no early exit: the full model itself
    elif confidence is None:
        assert dis / n <= budget + 1e-12
    else:
        assert clopper_pearson_upper(dis, n, confidence) <= budget + 1e-12
    # and nothing with fewer layers run fits the budget
    best_run, _, _ = _brute_force(decision, pred, budget, confidence)
    assert exits.sum() == best_run


def test_budget_zero_with_perfect_early_answers_exits_at_the_first_layer():
    decision = np.tile(np.array([3.0, 2.0, 1.0, 0.0]), (10, 1))
    pred = np.ones((10, 4), dtype=int)
    choice = choose_threshold(decision, pred, 0.0)
    assert choice.min_layer == 1 and choice.mean_exit_layer == 1.0 and choice.threshold < 3.0


def test_no_feasible_threshold_means_never():
    decision = np.tile(np.array([3.0, 2.0, 1.0, 0.0]), (4, 1))
    pred = np.array([[0, 0, 0, 1]] * 4)  # every early answer is wrong
    choice = choose_threshold(decision, pred, 0.1)
    assert choice.threshold is None and choice.mean_exit_layer == 4.0 and choice.n_disagree == 0


def test_clopper_pearson():
    # k = 0: the bound solves (1 - p)^n = 1 - c
    n = 300
    assert float(clopper_pearson_upper(0, n, 0.95)) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    assert float(clopper_pearson_upper(n, n, 0.95)) == 1.0
    bounds = clopper_pearson_upper(np.arange(5), 100, 0.95)
    assert np.all(np.diff(bounds) > 0) and np.all(bounds > np.arange(5) / 100)


def test_layer_flops_counts_projections_mlp_and_attention(llama_like):
    cfg = type("C", (), llama_like)()
    d, d_attn, d_kv, d_ff = 64, 64, 32, 128
    per_token = 2 * (2 * d * d_attn + 2 * d * d_kv + 3 * d * d_ff)
    assert layer_flops(cfg, 1) == pytest.approx(per_token + 2 * 2 * d_attn * 1)
    t = 100
    assert layer_flops(cfg, t) == pytest.approx(per_token * t + 2 * 2 * d_attn * t * (t + 1) / 2)


def test_label_bias_estimators(make_features):
    f = make_features(400, prior=2.0)
    assert estimate_label_bias("none", f) is None
    for method in ("mean", "balanced"):
        b = estimate_label_bias(method, f)
        assert b.shape == (f.n_layers, 2)
        np.testing.assert_allclose(b.sum(axis=1), 0.0, atol=1e-12)
        # the synthetic model prefers label 1 before the answer settles: the bias pushes against it
        assert (b[:3, 1] < 0).all()
    _, _, raw = label_signals(f)
    _, _, cor = label_signals(f, estimate_label_bias("balanced", f))
    assert abs(np.mean(cor[:, 0]) - 0.5) < 0.05 < abs(np.mean(raw[:, 0]) - 0.5)
    cf = f.subset(np.arange(3))
    assert estimate_label_bias("content-free", f, cf).shape == (f.n_layers, 2)
    with pytest.raises(ValueError, match="content-free prompts"):
        estimate_label_bias("content-free", f)
    with pytest.raises(ValueError, match="unknown label-bias method"):
        estimate_label_bias("magic", f)


@pytest.mark.parametrize("method", ["svm", "logreg", "gap"])
@pytest.mark.parametrize("label_bias_estimator", ["none", "mean"])
def test_calibrate_then_evaluate_respects_the_budget_on_heldout(make_features, method, label_bias_estimator):
    cal, held, test = make_features(300, seed=0), make_features(300, seed=1), make_features(300, seed=2)
    clf = calibrate(cal, held, method=method, label_bias_estimator=label_bias_estimator, budget=0.02)
    on_held = evaluate(held, clf)
    assert 1 - on_held["agreement"] <= 0.02 + 1e-12
    assert on_held["mean_exit_layer"] == pytest.approx(clf.info["heldout_mean_exit_layer"])
    m = evaluate(test, clf)
    assert set(m) == set(METRIC_KEYS)
    assert m["pruning_ratio"] > 0.05  # the synthetic answers settle early: something is saved
    assert m["pruning_ratio"] <= m["oracle_pruning_ratio"] + 0.05
    assert 0 < m["flops_saved"] < 1
    assert m["wallclock_full_s"] is None and m["speedup"] is None


def test_confidence_bound_is_more_conservative(make_features):
    cal, held = make_features(300, seed=0), make_features(300, seed=1)
    plain = calibrate(cal, held, budget=0.03)
    bounded = calibrate(cal, held, budget=0.03, confidence=0.95)
    assert bounded.info["heldout_disagreement_upper_bound"] <= 0.03
    assert bounded.info["heldout_mean_exit_layer"] >= plain.info["heldout_mean_exit_layer"]


def test_gold_target_and_layer_feature(make_features):
    cal, held = make_features(300, seed=0), make_features(300, seed=1)
    clf = calibrate(cal, held, target="gold", use_layer=False)
    assert clf.w_layer == 0.0 and clf.features == ("top_prob", "gap")
    clf = calibrate(cal, held, target="consistency", use_layer=True)
    assert clf.features == ("top_prob", "gap", "layer")


def test_wallclock_interface(make_features):
    cal, held, test = make_features(100, seed=0), make_features(100, seed=1), make_features(100, seed=2)
    clf = calibrate(cal, held, budget=0.05)
    calls = []

    def fake_measure(model, tokenizer, prompts, classifier, batch_size):
        calls.append((len(prompts), classifier, batch_size))
        from adainfer.calibration.evaluate import simulate

        return {"full_s": 2.0, "adainfer_s": 1.0, "exit_layers": simulate(test, classifier)["exit_layers"]}

    m = evaluate(test, clf, measure_wallclock=fake_measure, model=object(), tokenizer=object(), prompts=["p"] * 100)
    assert calls == [(100, clf, 32)]
    assert m["speedup"] == 2.0 and m["runtime_exit_match"] == 1.0
    assert m["speedup_vs_ideal"] == pytest.approx(2.0 * (1 - m["pruning_ratio"]))
    with pytest.raises(ValueError, match="needs model"):
        evaluate(test, clf, measure_wallclock=fake_measure)


def test_threshold_sweep_spans_no_exit_to_earliest(make_features):
    cal, held, test = make_features(200, seed=0), make_features(200, seed=1), make_features(200, seed=2)
    clf = calibrate(cal, held, budget=0.05)
    points = threshold_sweep(test, clf, n_points=20)
    assert points[0]["threshold"] is None and points[0]["pruning_ratio"] == 0.0
    assert points[0]["agreement"] == 1.0
    ratios = [p["pruning_ratio"] for p in points]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(ratios))  # lower t, more savings
    assert ratios[-1] == pytest.approx(1 - clf.min_layer / clf.n_layers)


def test_flops_saved_counts_layers_checks_and_head(make_features, llama_like):
    from adainfer.calibration.evaluate import simulate
    from adainfer.calibration.metrics import check_flops, head_flops

    test = make_features(50, seed=3)
    test.prompt_lengths[:] = 64  # equal lengths: FLOPs saved is the layer saving minus overheads
    clf = calibrate(make_features(200, seed=0), make_features(200, seed=1), budget=0.05)
    m = evaluate(test, clf)
    cfg = type("C", (), llama_like)()
    exits = simulate(test, clf)["exit_layers"]
    per_layer = float(layer_flops(cfg, 64))
    checks = np.array([sum(1 for k in clf.checked_layers if k <= e) for e in exits])
    full = 50 * (12 * per_layer + head_flops(cfg))
    ada = float(np.sum(exits * per_layer + checks * check_flops(cfg, 2) + head_flops(cfg)))
    assert m["flops_saved"] == pytest.approx(1 - ada / full, rel=1e-9)
    assert m["checks_per_row"] == pytest.approx(checks.mean())
    assert 0 < m["flops_saved"] < m["pruning_ratio"]
