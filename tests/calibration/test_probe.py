"""Probe exit heads: per-layer probes of the hidden state, fitted with scikit-learn,
standardisation folded in, saved beside the classifier, decoded by the runtime's fused exit head."""

from __future__ import annotations

import dataclasses
import json

import adainfer
import numpy as np
import pytest
import torch
from adainfer.calibration.classifier import ClassifierFileError, ModelIdentity, StopClassifier
from adainfer.calibration.evaluate import evaluate, simulate
from adainfer.calibration.features import LayerFeatures
from adainfer.calibration.fit import calibrate
from adainfer.calibration.probe import ProbeHeads, cross_fitted_logits, fit_probes, signals_from_logits
from tiny_models import decode_hidden, left_padded_batch, tiny_llama

META = {
    "model_type": "llama",
    "num_hidden_layers": 6,
    "vocab_size": 100,
    "hidden_size": 32,
    "config": {
        "model_type": "llama",
        "num_hidden_layers": 6,
        "vocab_size": 100,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
    },
}


def planted(n: int, seed: int, signal_from: int = 2, n_layers: int = 6, d: int = 32):
    """Hidden states whose layers >= ``signal_from`` carry the answer linearly (a planted rule);
    the lens (label logits) carries it only at the last layer."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=d)  # the same rule for every split
    answer = rng.integers(0, 2, n)
    hidden = rng.normal(size=(n, n_layers - 1, d)) * 3 + 1.5  # offset and scale: standardisation matters
    for j in range(signal_from - 1, n_layers - 1):
        hidden[:, j] += np.outer((2 * answer - 1) * 6.0, w / np.linalg.norm(w))
    logits = rng.normal(size=(n, n_layers, 2)) * 0.2
    logits[:, -1, 1] += (2 * answer - 1) * 3.0  # the full model's answer
    feats = LayerFeatures(
        label_logits=logits.astype(np.float32),
        labels=answer.astype(np.int64),
        label_token_ids=np.array([7, 9]),
        prompt_lengths=np.full(n, 20),
        hidden=hidden.astype(np.float32),
        meta=dict(META),
    )
    return feats, answer


def test_probes_recover_a_planted_linear_rule():
    train, y = planted(300, seed=0)
    test, y_test = planted(300, seed=1)
    probes = fit_probes(train.hidden, y, n_labels=2)
    acc = (probes.logits(test.hidden).argmax(-1) == y_test[:, None]).mean(axis=0)
    assert acc[0] < 0.65, f"layer 1 holds no signal: {acc}"
    assert (acc[1:] > 0.95).all(), f"layers >= 2 hold the rule: {acc}"


def test_folded_standardisation_equals_the_fitted_pipeline():
    from sklearn.linear_model import LogisticRegression

    train, y = planted(200, seed=2)
    x = train.hidden[:, 3].astype(np.float64)
    probes = fit_probes(train.hidden, y, n_labels=2, c=0.05)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    ref = LogisticRegression(C=0.05, max_iter=2000).fit(z, y).decision_function(z)
    got = probes.logits(train.hidden)[:, 3]
    np.testing.assert_allclose(got[:, 1] - got[:, 0], ref, rtol=1e-4, atol=1e-4)


def test_cross_fitting_never_scores_a_probe_on_its_own_rows(monkeypatch):
    """Per fold, recorded from the probes cross_fitted_logits fits: no example used to fit a fold's probes
    is scored by them, each fold is fitted on all the other examples (with their own targets), every
    example is scored by exactly one fold, and its cross-fitted logits are those of its fold's probes."""
    import adainfer.calibration.probe as probe_mod

    train, y = planted(120, seed=3)
    row_of = {h.tobytes(): i for i, h in enumerate(train.hidden)}
    assert len(row_of) == 120
    ids = lambda hidden: [row_of[h.tobytes()] for h in np.asarray(hidden)]
    folds = []
    real_fit = probe_mod.fit_probes

    class Recorded:
        """A fold's probes, recording the examples they score."""

        def __init__(self, fold):
            self.fold = fold

        def logits(self, hidden):
            self.fold["scored"] += ids(hidden)
            return self.fold["probes"].logits(hidden)

    def spy(hidden, target, n_labels, c=probe_mod.DEFAULT_C):
        fold = {"fit": ids(hidden), "scored": [], "probes": real_fit(hidden, target, n_labels, c)}
        np.testing.assert_array_equal(target, y[fold["fit"]])
        folds.append(fold)
        return Recorded(fold)

    monkeypatch.setattr(probe_mod, "fit_probes", spy)
    oof = cross_fitted_logits(train.hidden, y, 2)
    monkeypatch.undo()
    assert len(folds) == probe_mod.DEFAULT_FOLDS
    for f, fold in enumerate(folds):
        fit, scored = set(fold["fit"]), fold["scored"]
        assert len(fit) == len(fold["fit"]) and len(set(scored)) == len(scored) > 0
        assert not fit & set(scored), f"fold {f} scores examples it was fitted on: {sorted(fit & set(scored))[:8]}"
        assert fit | set(scored) == set(range(120)), f"fold {f} is not fitted on every other example"
        np.testing.assert_array_equal(oof[scored], fold["probes"].logits(train.hidden[scored]))
    assert sorted(i for fold in folds for i in fold["scored"]) == list(range(120)), "each example once"
    own = fit_probes(train.hidden, y, 2).logits(train.hidden)
    # in-sample probes are more confident than out-of-fold ones (what the stop classifier must not see)
    conf = lambda z: signals_from_logits(z)[0].mean()
    assert conf(own) > conf(oof)


def test_probe_calibration_saves_far_more_layers_than_the_lens_when_the_lens_is_blind():
    cal, _ = planted(300, seed=4)
    held, _ = planted(300, seed=5)
    test, _ = planted(300, seed=6)
    kw = dict(method="logreg", budget=0.02, label_bias_estimator="none")
    lens = calibrate(cal, held, readout="lens", **kw)
    probe = calibrate(cal, held, readout="probe", **kw)
    m_lens, m_probe = evaluate(test, lens), evaluate(test, probe)
    assert probe.readout == "probe" and probe.probe.n_fit == 300
    assert m_probe["pruning_ratio"] > m_lens["pruning_ratio"] + 0.3, (m_lens["pruning_ratio"], m_probe["pruning_ratio"])
    assert m_probe["agreement"] >= 0.95


def _probe_classifier(model, probes: ProbeHeads, threshold: float = 0.0) -> StopClassifier:
    return StopClassifier(
        identity=ModelIdentity.from_model(model),
        method="logreg",
        target="consistency",
        vocab_mode="labels",
        w_top_prob=6.0,
        w_gap=0.0,
        w_layer=0.0,
        intercept=-4.32,  # stops when the probe's top probability passes 0.72
        threshold=threshold,
        min_layer=1,
        label_token_ids=(5, 17),
        label_words=(" a", " b"),
        readout="probe",
        probe=probes,
    )


def test_probe_classifier_file_round_trip_and_refusals(tmp_path):
    model = tiny_llama("sdpa")
    rng = np.random.default_rng(0)
    probes = ProbeHeads(
        weight=rng.normal(size=(3, 2, 64)).astype(np.float32), bias=rng.normal(size=(3, 2)).astype(np.float32), n_fit=9
    )
    clf = _probe_classifier(model, probes)
    path = tmp_path / "clf.json"
    clf.save(path)
    side = tmp_path / "clf.probe.safetensors"
    data = json.loads(path.read_text())
    assert data["readout"] == "probe" and data["probe"]["file"] == side.name
    assert data["probe"]["bytes"] == side.stat().st_size and data["probe"]["layers"] == 3
    back = StopClassifier.load(path)
    assert back == clf and back.probe.n_fit == 9
    np.testing.assert_array_equal(back.probe.weight, probes.weight)
    np.testing.assert_array_equal(back.probe.bias, probes.bias)
    # a damaged or replaced weight file is refused
    side.write_bytes(side.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ClassifierFileError, match="sha256"):
        StopClassifier.load(path)
    side.unlink()
    with pytest.raises(ClassifierFileError, match="cannot be read"):
        StopClassifier.load(path)
    # probes of another shape (another model's layers or width) are refused
    with pytest.raises(ClassifierFileError, match="needs"):
        _probe_classifier(model, dataclasses.replace(probes, weight=probes.weight[:2], bias=probes.bias[:2]))
    with pytest.raises(ClassifierFileError, match="finite float32"):
        _probe_classifier(model, dataclasses.replace(probes, bias=np.full((3, 2), np.inf, dtype=np.float32)))
    other = tiny_llama("sdpa", layers=5)
    with pytest.raises(ValueError, match="classifier was fitted for a 4-layer"):
        clf.check_compatible(other)


def _tiny_features(model, out, hidden: np.ndarray, labels: list[int]) -> LayerFeatures:
    """The features of a 4-layer tiny model's forward ``out`` (with hidden states) over ``labels``."""
    states = out.hidden_states
    lens = [decode_hidden(model, states[k][:, -1])[:, labels] for k in range(1, 4)] + [out.logits[:, -1, labels]]
    n = hidden.shape[0]
    return LayerFeatures(
        label_logits=torch.stack(lens, dim=1).float().numpy(),
        labels=np.full(n, -1),
        label_token_ids=np.array(labels),
        prompt_lengths=np.full(n, 9),
        hidden=hidden,
        meta={**META, "num_hidden_layers": 4, "hidden_size": 64},
    )


@torch.inference_mode()
def test_runtime_probe_exits_and_answers_equal_the_simulation():
    """The patched model with a probe classifier stops and answers where the simulation from the
    same hidden states says, through every read-out."""
    model = tiny_llama("sdpa")
    batch = left_padded_batch(8, 9, seed=3)
    out = model(**batch, output_hidden_states=True)
    states = out.hidden_states
    hidden = torch.stack([states[k][:, -1] for k in range(1, 4)], dim=1).numpy()  # (8, 3, 64)
    rng = np.random.default_rng(1)
    probes = ProbeHeads(
        weight=(rng.normal(size=(3, 2, 64)) * 3.0).astype(np.float32), bias=np.zeros((3, 2), np.float32)
    )
    clf = _probe_classifier(model, probes)
    labels = [5, 17]
    feats = _tiny_features(model, out, hidden, labels)
    sim = simulate(feats, clf)
    assert 0 < (sim["exit_layers"] < 4).sum() < 8, f"the test needs a mix of exits: {sim['exit_layers']}"
    with adainfer.patched(model, clf) as handle:
        logits = model(**batch).logits
        stats = handle.last_stats
    assert stats.exit_layers.tolist() == sim["exit_layers"].tolist()
    assert stats.answer_label.tolist() == sim["exit_answer"].tolist()
    assert logits[:, -1, labels].argmax(-1).tolist() == sim["exit_answer"].tolist()
    exited = sim["exit_layers"] < 4
    z = probes.logits(hidden)  # (8, 3, 2)
    want = torch.log_softmax(torch.tensor(z[np.arange(8), np.minimum(sim["exit_layers"], 3) - 1]), dim=-1).float()
    torch.testing.assert_close(stats.label_logprobs[exited], want[exited], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_bf16_model_reads_its_probes_in_fp32():
    """Under a bf16 model the probe head keeps its fp32 weight (the rows are cast to it: a bf16 copy
    of W rounds the large, cancelling terms that its folded standardisation puts in W h and the
    bias), and the runtime's exits and answers are the simulation's from the same bf16 states."""
    model = tiny_llama("sdpa").to(torch.bfloat16)
    batch = left_padded_batch(8, 9, seed=3)
    out = model(**batch, output_hidden_states=True)
    states = out.hidden_states
    hidden = torch.stack([states[k][:, -1] for k in range(1, 4)], dim=1).float().numpy()  # bf16 values, exact
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(3, 2, 64)) * 3.0).astype(np.float32)
    offset = 40.0 * rng.normal(size=(64,))  # a large mean folded into the bias, as standardisation does
    bias = -np.einsum("lkd,d->lk", weight, offset).astype(np.float32)
    probes = ProbeHeads(weight=weight, bias=bias)
    clf = _probe_classifier(model, probes)
    head, _ = adainfer.ClassifierPolicy(clf).head_and_rule(1, adainfer.lens_head(model))
    assert head.weight.dtype == torch.float32 and model.dtype == torch.bfloat16
    labels = [5, 17]
    feats = _tiny_features(model, out, hidden, labels)
    sim = simulate(feats, clf)
    with adainfer.patched(model, clf, adainfer.AdaInferConfig(mode="mask")) as handle:
        model(**batch)
        stats = handle.last_stats
    assert stats.exit_layers.tolist() == sim["exit_layers"].tolist()
    assert stats.answer_label.tolist() == sim["exit_answer"].tolist()
