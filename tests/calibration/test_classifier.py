"""StopClassifier: fitting recovers a known rule, kernel-ready scores, JSON round trip, refusals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adainfer.calibration.classifier import ClassifierFileError, ModelIdentity, StopClassifier
from adainfer.calibration.linear_fit import fit_linear
from adainfer.models import lens_head
from adainfer.runtime.policy import ClassifierPolicy

from adainfer_kernels.head import ReadoutHead, StopRule
from adainfer_kernels.reference import exit_head_ref

IDENT = ModelIdentity(model_type="llama", num_hidden_layers=30, vocab_size=49152, hidden_size=576)


def _clf(**kw) -> StopClassifier:
    base = dict(
        identity=IDENT,
        method="svm",
        target="consistency",
        vocab_mode="labels",
        w_top_prob=1.25,
        w_gap=3.0,
        w_layer=0.1,
        intercept=-2.0,
        threshold=0.5,
        min_layer=18,
        label_token_ids=(3524, 2731),
        label_words=(" negative", " positive"),
        label_bias=tuple((0.1 * k, -0.1 * k) for k in range(30)),
        label_bias_estimator="mean",
        info={"task": {"task": "tweet-sentiment", "k_shot": 4}, "budget": 0.01},
    )
    base.update(kw)
    return StopClassifier(**base)


def _model(layers=30, vocab=49152, hidden=576, model_type="llama"):
    return SimpleNamespace(
        config=SimpleNamespace(model_type=model_type, num_hidden_layers=layers, vocab_size=vocab, hidden_size=hidden)
    )


@pytest.mark.parametrize("method", ["svm", "logreg"])
def test_fit_recovers_a_known_separating_rule(method):
    # settled iff 4 * gap + 1 * top_prob - 0.05 * layer > 2, on raw (unstandardised) features
    rng = np.random.default_rng(0)
    n = 4000
    top = rng.uniform(0.5, 1.0, n)
    gap = rng.uniform(0.0, 1.0, n) * (2 * top - 1)
    layer = rng.integers(1, 30, n).astype(float)
    truth = np.array([1.0, 4.0, -0.05])
    x = np.stack([top, gap, layer], 1)
    y = x @ truth > 2.0
    fit = fit_linear(x, y, method)
    # the decision function is in raw-feature units: it must classify the raw rows by itself
    pred = x @ fit.weights + fit.intercept > 0
    assert (pred == y).mean() > 0.97, (pred == y).mean()
    # direction: positive on the gap, negative on the layer, same ratio as the truth
    w = fit.weights / np.linalg.norm(fit.weights)
    t = truth / np.linalg.norm(truth)
    assert fit.weights[1] > 0 and fit.weights[2] < 0
    assert w @ t > 0.97, (w, t)


def test_fit_folds_the_standardisation_exactly():
    # a fit on features scaled by 1000 must give the same decisions as on the originals
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 2))
    y = x[:, 0] - 0.5 * x[:, 1] > 0.2
    a = fit_linear(x, y, "logreg")
    b = fit_linear(x * [1000.0, 0.001], y, "logreg")
    da = x @ a.weights + a.intercept
    db = (x * [1000.0, 0.001]) @ b.weights + b.intercept
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-4)


def test_gap_baseline_is_the_gap():
    fit = fit_linear(np.random.rand(10, 2), np.arange(10) % 2 == 0, "gap")
    assert list(fit.weights) == [0.0, 1.0] and fit.intercept == 0.0


def test_fit_refuses_one_class():
    with pytest.raises(ValueError, match="nothing to separate"):
        fit_linear(np.random.rand(10, 2), np.ones(10, bool), "svm")


def test_stop_rule_folds_layer_term_and_threshold():
    clf = _clf()
    for layer in (18, 22, 29):
        s = clf.stop_rule(layer)
        assert isinstance(s, StopRule)
        top, gap = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.2])
        expected = clf.decision(top.numpy(), gap.numpy(), layer) - clf.threshold
        np.testing.assert_allclose(s(top, gap).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert clf.checked_layers == tuple(range(18, 30))
    # before min_layer: never stops; layer L: always stops
    assert float(clf.stop_rule(5)(torch.tensor([1.0]), torch.tensor([1.0]))) < 0
    assert float(clf.stop_rule(30)(torch.tensor([0.5]), torch.tensor([0.0]))) > 0
    with pytest.raises(ValueError, match="out of range"):
        clf.stop_rule(31)


def test_no_threshold_means_no_checks():
    clf = _clf(threshold=None)
    assert clf.checked_layers == ()
    assert float(clf.stop_rule(25)(torch.tensor([1.0]), torch.tensor([1.0]))) < 0


def test_logit_bias_and_vocab_subset():
    clf = _clf()
    b = clf.label_bias_at(7)
    assert b.dtype == torch.float32 and b.shape == (2,)
    np.testing.assert_allclose(b.numpy(), [0.6, -0.6], rtol=1e-6)
    assert clf.vocab_subset.tolist() == [3524, 2731]
    full = _clf(vocab_mode="full", label_bias=None)
    assert full.vocab_subset is None and full.label_bias_at(3) is None


def test_kernel_score_equals_the_numpy_decision():
    """What the runtime computes (exit head over label tokens + logit_bias, StopRule) equals
    the classifier's numpy decision on the label probabilities the features give."""
    torch.manual_seed(0)
    d, v = 32, 100
    ids = (7, 42)
    bias_rows = tuple((0.3, -0.2) for _ in range(30))
    clf = _clf(label_token_ids=ids, label_bias=bias_rows, identity=ModelIdentity("llama", 30, v, d))
    head_w = torch.randn(v, d)
    h = torch.randn(5, d)
    layer = 20
    head = ReadoutHead(
        weight=head_w,
        norm="rms",
        norm_weight=torch.ones(d),
        eps=1e-6,
        vocab_subset=clf.vocab_subset,
        logit_bias=clf.label_bias_at(layer),
    )
    sig = exit_head_ref(h, head, clf.stop_rule(layer))
    # numpy path: softmax over the two biased label logits
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    z = (x @ head_w[list(ids)].T).double().numpy() + np.array(bias_rows[layer - 1])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top, gap = p.max(1), np.abs(p[:, 0] - p[:, 1])
    expected = clf.decision(top, gap, layer) - clf.threshold
    np.testing.assert_allclose(sig.score.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert sig.argmax.tolist() == [ids[i] for i in p.argmax(1)]


def test_save_creates_the_folder_and_load_classifier_reads_the_file_or_its_folder(tmp_path):
    import adainfer

    clf = _clf()
    path = tmp_path / "new" / "folder" / "classifier.json"
    clf.save(path)
    assert adainfer.load_classifier(path) == clf
    assert adainfer.load_classifier(path.parent) == clf
    with pytest.raises(FileNotFoundError, match=r"classifier\.json"):
        adainfer.load_classifier(tmp_path)  # a folder without classifier.json


def test_json_round_trip_is_bit_exact(tmp_path):
    clf = _clf(w_top_prob=0.1 + 0.2, w_gap=1 / 3, intercept=-math.pi, threshold=2.0**-40)
    path = tmp_path / "clf.json"
    clf.save(path)
    back = StopClassifier.load(path)
    assert back == clf
    for name in ("w_top_prob", "w_gap", "w_layer", "intercept", "threshold"):
        assert getattr(back, name).hex() == getattr(clf, name).hex()
    assert back.label_bias == clf.label_bias
    assert back.info == clf.info
    data = json.loads(path.read_text())
    assert data["model"] == {"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 49152, "hidden_size": 576}
    assert data["features"] == ["top_prob", "gap", "layer"]
    assert data["version"] == 3 and data["readout"] == "lens" and data["probe"] is None
    # a version-2 file (keys "exit_head" and "bias_method") still loads, with its own values
    v2 = {k: v for k, v in data.items() if k not in ("readout", "label_bias_estimator")}
    v2 |= {"version": 2, "exit_head": "lens", "bias_method": data["label_bias_estimator"]}
    assert StopClassifier.from_dict(v2) == clf
    v2["exit_head"] = "nonsense"
    with pytest.raises(ClassifierFileError, match="readout 'nonsense'"):
        StopClassifier.from_dict(v2)
    # a version-1 file (lens only, before probes) still loads
    del data["readout"], data["probe"]
    data["version"] = 1
    assert StopClassifier.from_dict(data) == clf


def test_identity_mismatch_is_refused_with_a_clear_message():
    clf = _clf()
    clf.check_compatible(_model())
    with pytest.raises(ValueError) as err:
        clf.check_compatible(_model(layers=32))
    msg = str(err.value)
    assert "30-layer llama model" in msg and "vocab 49152" in msg and "32-layer" in msg
    with pytest.raises(ValueError, match="vocab_size 49152 vs 32000"):
        clf.check_compatible(_model(vocab=32000))
    with pytest.raises(ValueError, match="model_type 'llama' vs 'opt'"):
        clf.check_compatible(_model(model_type="opt"))


def _edited(tmp_path, edit):
    data = _clf().to_dict()
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("weights"), "missing key"),
        (lambda d: d.pop("threshold"), "missing key"),
        (lambda d: d["weights"].pop("gap"), "weights lack 'gap'"),
        (lambda d: d["weights"].update(gap="3.0"), "gap must be a number"),
        (lambda d: d["model"].update(num_hidden_layers="30"), "num_hidden_layers must be int"),
        (lambda d: d["model"].pop("vocab_size"), "lacks 'vocab_size'"),
        (lambda d: d.update(version=4), "version 4 is not supported"),
        (lambda d: d.update(format="something else"), "not a stop classifier"),
        (lambda d: d.update(method="forest"), "method 'forest'"),
        (lambda d: d.update(min_layer=0), "min_layer 0 is outside"),
        (lambda d: d.update(min_layer=True), "min_layer must be int"),
        (lambda d: d["label_bias"].pop(), "label_bias has 29 rows"),
        (lambda d: d["label_bias"][3].append(0.0), "expected 2"),
        (lambda d: d.update(label_token_ids=[3524, 3524]), "not distinct"),
        (lambda d: d.update(label_token_ids=[3524, 60000]), "outside the vocabulary"),
        (lambda d: d.update(label_words=["x"]), "1 label_words for 2"),
        (lambda d: d.update(vocab_mode="labels", label_token_ids=None, label_bias=None), "at least 2"),
    ],
)
def test_hand_edited_files_are_refused(tmp_path, edit, match):
    with pytest.raises(ClassifierFileError, match=match):
        StopClassifier.load(_edited(tmp_path, edit))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_weights_are_refused(tmp_path, token):
    path = tmp_path / "nan.json"
    text = json.dumps(_clf().to_dict()).replace('"gap": 3.0', f'"gap": {token}')
    assert token in text
    path.write_text(text)
    with pytest.raises(ClassifierFileError, match="not a valid number"):
        StopClassifier.load(path)


def test_corrupt_and_wrong_files_are_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "adainfer.StopClassifier", "version": 1, "weights": {')
    with pytest.raises(ClassifierFileError, match="not a valid classifier JSON"):
        StopClassifier.load(path)
    path.write_bytes(b"\x80\x81\x82")
    with pytest.raises(ClassifierFileError, match="not a valid classifier JSON"):
        StopClassifier.load(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ClassifierFileError, match="expected a JSON object"):
        StopClassifier.load(path)
    with pytest.raises(FileNotFoundError):
        StopClassifier.load(tmp_path / "missing.json")


def test_constructor_refuses_nan_weights():
    with pytest.raises(ClassifierFileError, match="not finite"):
        _clf(w_gap=float("nan"))
    with pytest.raises(ClassifierFileError, match="threshold is not finite"):
        _clf(threshold=float("inf"))


def test_policy_head_for_a_layer_carries_the_label_subset_and_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    clf = _clf(
        identity=ModelIdentity.from_model(model),
        min_layer=1,
        label_token_ids=(7, 42),
        label_bias=((0.1, -0.1), (0.2, -0.2), (0.3, -0.3)),
    )
    clf.check_compatible(model)
    # The runtime's policy is the one place a per-layer head is built.
    head, score = ClassifierPolicy(clf).head_and_rule(2, lens_head(model))
    assert head.vocab_subset.tolist() == [7, 42] and head.norm == "rms"
    np.testing.assert_allclose(head.logit_bias.numpy(), [0.2, -0.2], rtol=1e-6)
    assert score == clf.stop_rule(2)
    with torch.inference_mode():
        sig = exit_head_ref(torch.randn(3, 16), head, score)
    assert set(sig.argmax.tolist()) <= {7, 42} and sig.score.shape == (3,)


# -- values the float64 loader accepts but the float32 runtime cannot hold; info; nesting ------------------
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["weights"].update(gap=1e39), "weights.gap 1e.39 does not fit in float32"),
        (lambda d: d["weights"].update(top_prob=-1e39), "weights.top_prob -1e.39 does not fit in float32"),
        (lambda d: d["weights"].update(layer=1e39), "weights.layer 1e.39 does not fit in float32"),
        (lambda d: d.update(intercept=1e39), "intercept 1e.39 does not fit in float32"),
        (lambda d: d.update(threshold=-1e39), "threshold -1e.39 does not fit in float32"),
        (lambda d: d["label_bias"][4].__setitem__(1, 1e39), "label_bias row 5 holds 1e.39, which does not fit"),
        # each value fits alone; the folded bias from layer 27 on (intercept + 27 w_layer - threshold) does not
        (lambda d: d.update(intercept=1e38, weights={"top_prob": 1.0, "gap": 1.0, "layer": 9e36}), "of layer 27 "),
    ],
)
def test_values_beyond_float32_are_refused_at_load(tmp_path, edit, match):
    with pytest.raises(ClassifierFileError, match=match) as err:
        StopClassifier.load(_edited(tmp_path, edit))
    assert "re-run `adainfer calibrate`" in str(err.value)


def test_constructor_refuses_values_beyond_float32():
    with pytest.raises(ClassifierFileError, match=r"weight w_gap 1e\+39 does not fit in float32"):
        _clf(w_gap=1e39)
    with pytest.raises(ClassifierFileError, match="label_bias holds a value that does not fit in float32"):
        _clf(label_bias=tuple((1e39, 0.0) for _ in range(30)))
    # the largest float32 magnitudes are fine
    _clf(w_top_prob=3.4e38, w_gap=-3.4e38, w_layer=0.0, intercept=0.0, threshold=0.0)


@pytest.mark.parametrize(
    ("info", "match"),
    [
        ("tweet-sentiment", r"info must be a JSON object \(or null\), got str"),
        (3, "info must be a JSON object .* got int"),
        ([1, 2], "info must be a JSON object .* got list"),
        ({"task": "tweet-sentiment"}, "info.task must be dict or null, got str"),
        ({"budget": "0.01"}, "info.budget must be int or float, got str"),
        ({"budget": 1.5}, r"info.budget must be in \[0, 1\)"),
        ({"confidence": 0}, r"info.confidence must be in \(0, 1\) or null"),
        ({"task": {"k_shot": "4"}}, "info.task.k_shot must be int, got str"),
        ({"task": {"k_shot": -1}}, "info.task.k_shot must be >= 0"),
        ({"task": {"k_shot": True}}, "info.task.k_shot must be int, got bool"),
        ({"task": {"template": 7}}, "info.task.template must be str or null"),
        ({"task": {"sizes": [300, 300]}}, "info.task.sizes must be dict"),
        ({"task": {"sizes": {"test": -5}}}, "info.task.sizes.test must be a positive int"),
        ({"task": {"sizes": {"test": "300"}}}, "info.task.sizes.test must be a positive int"),
        ({"task": {"sizes": {"train": 300}}}, "info.task.sizes has split 'train'"),
        ({"task": {"label_words_arg": "neg=bad"}}, "info.task.label_words_arg must be list or null"),
        ({"task": {"label_words_arg": [1, 2]}}, "info.task.label_words_arg must be a list of strings"),
        ({"task": {"min_confidence": 2}}, r"info.task.min_confidence must be in \[0, 1\]"),
        ({"task": {"encoding": ["latin-1"]}}, "info.task.encoding must be str or null"),
    ],
)
def test_info_of_the_wrong_type_is_refused_at_load(tmp_path, info, match):
    with pytest.raises(ClassifierFileError, match=match):
        StopClassifier.load(_edited(tmp_path, lambda d: d.update(info=info)))


def test_info_null_and_free_form_keys_load(tmp_path):
    assert StopClassifier.load(_edited(tmp_path, lambda d: d.update(info=None))).info == {}
    free = {"note": ["anything", {"goes": 1}], "budget": 0.0, "task": {"task": "x.csv", "custom": [1]}}
    assert StopClassifier.load(_edited(tmp_path, lambda d: d.update(info=free))).info == free
    # what `adainfer calibrate --task tweet-sentiment` writes without --template: the task's own
    bundled = {"task": {"task": "tweet-sentiment", "template": None, "k_shot": 4, "seed": 0}}
    assert StopClassifier.load(_edited(tmp_path, lambda d: d.update(info=bundled))).info == bundled


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_file_error(tmp_path, depth):
    path = tmp_path / "deep.json"
    text = json.dumps(_clf().to_dict())
    path.write_text(text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ClassifierFileError, match="nested"):
        StopClassifier.load(path)


def test_a_directory_and_other_header_values_are_file_errors(tmp_path):
    with pytest.raises(ClassifierFileError, match="is a directory: pass the classifier JSON file"):
        StopClassifier.load(tmp_path)
    for version in (True, 1.0, "1"):
        with pytest.raises(ClassifierFileError, match=r"version .* is not supported"):
            StopClassifier.load(_edited(tmp_path, lambda d, v=version: d.update(version=v)))
    with pytest.raises(ClassifierFileError, match="label_bias_estimator 'median' is not one of"):
        StopClassifier.load(_edited(tmp_path, lambda d: d.update(label_bias_estimator="median")))
