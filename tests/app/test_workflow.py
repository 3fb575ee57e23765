"""`adainfer.app.workflow`: calibrate and evaluate from Python on a model already loaded (what the
CLI's calibrate / eval call), on a tiny random Llama saved as a model directory."""

from __future__ import annotations

import json

import pytest
from adainfer.app import loading
from adainfer.app.cli import main
from adainfer.app.user_tasks import load_user_task
from adainfer.app.workflow import Evaluation, calibrate, evaluate, task_info_of
from adainfer.calibration.classifier import StopClassifier
from adainfer.calibration.evaluate import METRIC_KEYS
from tiny_models import save_tiny_model_dir

SIZES = {"calibration": 12, "heldout": 12, "test": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
    return str(folder), loading.load_model(str(folder))


@pytest.fixture
def reviews(tmp_path):
    lines = ["text,label"]
    for i in range(40):
        lines += [f"great product number {i},pos", f"awful thing number {i},neg"]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_calibrate_and_evaluate_from_python(tiny, reviews):
    _, loaded = tiny
    task = load_user_task(reviews, label_words=["bad", "good"], k_shot=2, sizes=SIZES)
    clf = calibrate(loaded.model, loaded.tokenizer, task, budget=0.2, method="gap", readout="lens", progress=False)
    assert isinstance(clf, StopClassifier) and clf.readout == "lens" and clf.method == "gap"
    assert clf.label_words == (" bad", " good") and clf.info["budget"] == 0.2 and clf.info["confidence"] == 0.9
    stored = clf.info["task"]
    assert stored == task_info_of(task.render(loaded.tokenizer))
    assert stored["task"] == "reviews.csv" and stored["template"] == "user" and stored["sizes"] == SIZES
    assert stored["k_shot"] == 2 and stored["label_words_arg"] == ["bad", "good"]

    result = evaluate(loaded.model, loaded.tokenizer, task, clf, batch_size=5, progress=False)
    assert isinstance(result, Evaluation) and result.classifier is clf
    assert set(result.metrics) == set(METRIC_KEYS) and result.metrics["n"] == 8
    assert result.features.n_examples == 8 and result.metrics["speedup"] is None  # not timed by default
    assert 0.0 <= result.metrics["runtime_accuracy"] <= 1.0
    row = result.row()
    assert row["variant"]["main"] and row["metrics"] is result.metrics and row["classifier"] is clf


def test_calibrate_refuses_what_cannot_be_fitted(tiny, reviews):
    _, loaded = tiny
    task = load_user_task(reviews, k_shot=2, sizes=SIZES)
    with pytest.raises(ValueError, match="readout 'probe' answers over the label tokens"):
        calibrate(loaded.model, loaded.tokenizer, task, readout="probe", vocab_mode="full")
    with pytest.raises(ValueError, match="unknown readout 'logit'"):
        calibrate(loaded.model, loaded.tokenizer, task, readout="logit")
    with pytest.raises(ValueError, match="unknown vocab_mode 'some'"):
        calibrate(loaded.model, loaded.tokenizer, task, vocab_mode="some")


def test_evaluate_refuses_a_classifier_of_other_label_tokens(tiny, reviews):
    _, loaded = tiny
    task = load_user_task(reviews, label_words=["bad", "good"], k_shot=2, sizes=SIZES)
    clf = calibrate(loaded.model, loaded.tokenizer, task, budget=0.2, method="gap", readout="lens", progress=False)
    other = load_user_task(reviews, label_words=["negative", "positive"], k_shot=2, sizes=SIZES)
    with pytest.raises(ValueError, match="classifier was fitted for label tokens"):
        evaluate(loaded.model, loaded.tokenizer, other, clf, progress=False)


def test_the_cli_evaluates_a_classifier_calibrated_from_python(tiny, reviews, tmp_path, capsys, monkeypatch):
    """``adainfer eval`` rebuilds the task from the settings ``calibrate`` stored (no task options given)."""
    folder, loaded = tiny
    task = load_user_task(reviews, label_words=["bad", "good"], k_shot=2, sizes=SIZES, seed=5)
    clf = calibrate(loaded.model, loaded.tokenizer, task, budget=0.2, method="gap", readout="lens", progress=False)
    (tmp_path / "clf").mkdir()
    clf.save(tmp_path / "clf" / "classifier.json")
    out = tmp_path / "out"
    argv = ["eval", "--model", folder, "--task", "reviews.csv", "--classifier", str(tmp_path / "clf")]
    argv += ["--out-dir", str(out), "--no-plots", "--wallclock-prompts", "0"]
    monkeypatch.chdir(reviews.parent)  # the stored task name is the file's name: run from its folder
    assert main(argv) == 0, capsys.readouterr().err
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["k_shot"] == 2 and settings["seed"] == 5 and settings["sizes"] == SIZES
    assert settings["label_words"] == [" bad", " good"] and settings["template"] == "user"


def test_cli_calibrates_a_three_label_task_and_reports_the_preflight(tiny, tmp_path, capsys):
    """A multi-class task end to end: three labels, the held-out split sized from the data (every
    example left), the rule chosen on calibration, the pre-flight report printed and stored."""
    folder, _ = tiny
    lines = ["text,label"]
    for i in range(30):
        lines += [f"great product number {i},pos", f"awful thing number {i},neg", f"a plain item number {i},mid"]
    data = tmp_path / "three.csv"
    data.write_text("\n".join(lines) + "\n")
    argv = ["calibrate", "--model", folder, "--task", str(data), "--label-words", "neg=bad", "mid=okay", "pos=good"]
    argv += ["--k-shot", "3", "--n-calibration", "12", "--n-test", "6", "--batch-size", "4", "--budget", "0.2"]
    assert main([*argv, "--out-dir", str(tmp_path / "clf")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    clf = StopClassifier.load(tmp_path / "clf" / "classifier.json")
    assert clf.label_token_ids is not None and len(clf.label_token_ids) == 3
    sizes = clf.info["task"]["sizes"]
    # 30 per class: the user-task demo pool takes its share, calibration 4 and test 2 per class, held-out the rest
    assert sizes["calibration"] == 12 and sizes["test"] == 6 and sizes["heldout"] >= 30 and sizes["heldout"] % 3 == 0
    assert clf.info["heldout_n"] == sizes["heldout"]
    assert "reading " in out and " prompts through every layer: about " in out
    assert "stop rule: " in out and "(mean exit layer on the calibration split: " in out
    chosen = clf.info["rule_choice"]["chosen"]
    assert (chosen["readout"], chosen["method"]) == (clf.readout, clf.method)
    assert len(clf.info["rule_choice"]["candidates"]) == 4  # lens, probe x gap, svm
    pre = clf.info["preflight"]
    assert "pre-flight (held-out split, " in out and f"verdict: {pre['verdict']}" in out
    assert pre["n_heldout"] == sizes["heldout"] and pre["batch_size"] == 4
    assert 0.0 <= pre["certified_saved"] <= pre["oracle_saved"] <= 1.0
    assert pre["certified_saved"] == pytest.approx(1.0 - clf.info["heldout_mean_exit_layer"] / clf.n_layers)
    assert pre["forward_fixed_s"] >= 0.0 and pre["forward_per_row_s"] >= 0.0 and pre["predicted_speedup"] >= 1.0
    # eval rebuilds the same three-label task from what calibrate stored
    out_dir = tmp_path / "out"
    argv = ["eval", "--model", folder, "--task", str(data), "--classifier", str(tmp_path / "clf")]
    argv += ["--out-dir", str(out_dir), "--no-plots", "--wallclock-prompts", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out_dir / "results.json").read_text())
    assert result["settings"]["sizes"] == sizes and result["rows"][0]["metrics"]["n"] == 6


def test_a_bf16_calibration_is_stored_and_evaluated_in_bf16(tiny, reviews, tmp_path, capsys):
    folder, _ = tiny
    common = ["--model", folder, "--task", str(reviews), "--label-words", "neg=bad", "pos=good", "--k-shot", "2"]
    sizes = ["--n-calibration", "12", "--n-heldout", "12", "--n-test", "8", "--batch-size", "4"]
    argv = ["calibrate", *common, *sizes, "--dtype", "bfloat16", "--budget", "0.2", "--out-dir", str(tmp_path / "c")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(bfloat16) ..." in out and "note: the bound is certified on the feature pass's bfloat16 numerics" in out
    assert StopClassifier.load(tmp_path / "c" / "classifier.json").info["dtype"] == "bfloat16"
    argv = ["eval", *common, "--classifier", str(tmp_path / "c"), "--out-dir", str(tmp_path / "o"), "--no-plots"]
    assert main([*argv, "--wallclock-prompts", "0"]) == 0, capsys.readouterr().err
    assert "attention sdpa, bfloat16" in capsys.readouterr().out  # eval runs in the calibrated dtype
