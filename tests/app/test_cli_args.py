"""The CLI refuses every bad argument before any work (before a model loads), with one line
`adainfer <cmd>: error: <problem and fix>` and exit status 2; deprecated spellings still work and warn;
`eval` records the settings it ran with. A tiny random Llama saved as a model directory (word-level
tokenizer) runs calibrate and eval in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adainfer.app import loading
from adainfer.app.cli import build_parser, main
from adainfer.calibration.classifier import StopClassifier
from tiny_models import save_tiny_model_dir


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the errors must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_bundled", refuse)


def _reviews(path, n=40):
    lines = ["review,stars"]
    for i in range(n):
        lines += [f"great product number {i},pos", f"awful thing number {i},neg"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    """Paths the cases refer to by name: a task CSV, a file, a folder, a classifier."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return {
        "csv": str(_reviews(tmp_path / "reviews.csv")),
        "file": str(tmp_path / "file.txt"),
        "folder": str(tmp_path / "folder"),
        "under_file": str(tmp_path / "file.txt" / "clf.json"),
        "missing": str(tmp_path / "missing.csv"),
        "clf": str(tmp_path / "clf.json"),
        "out": str(tmp_path / "out"),
    }


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(f"adainfer {command}: error: "), lines[0]
    return lines[0]


CAL = ["calibrate", "--task", "{csv}", "--out-dir", "{out}"]
EVAL = ["eval", "--task", "{csv}", "--classifier", "{file}"]
DEMO = ["demo"]
BAD_ARGS = [
    ([*CAL, "--batch-size", "-1"], "argument --batch-size: -1 is out of range; use a positive integer"),
    ([*CAL, "--batch-size", "0"], "--batch-size: 0 is out of range"),
    ([*CAL, "--batch-size", "many"], "--batch-size: 'many' is not an integer"),
    ([*DEMO, "--batch-size", "-1"], "--batch-size: -1 is out of range"),
    ([*CAL, "--n-calibration", "-5"], "--n-calibration: -5 is out of range; use a positive number of examples"),
    ([*CAL, "--n-heldout", "0"], "--n-heldout: 0 is out of range"),
    ([*CAL, "--n-test", "-1"], "--n-test: -1 is out of range"),
    ([*DEMO, "--n-test", "0"], "--n-test: 0 is out of range"),
    ([*EVAL, "--n-test", "-3"], "--n-test: -3 is out of range"),
    ([*CAL, "--budget", "1.5"], r"--budget: 1.5 is out of range; the disagreement budget is a rate in \[0, 1\)"),
    ([*CAL, "--budget", "1"], "--budget: 1 is out of range"),
    ([*CAL, "--budget", "-0.01"], "--budget: -0.01 is out of range"),
    ([*CAL, "--budget", "nan"], "--budget: nan is out of range"),
    ([*DEMO, "--budget", "5%"], "--budget: '5%' is not a number"),
    ([*CAL, "--confidence", "1"], r"--confidence: 1 is out of range; the confidence is a level in \[0, 1\)"),
    ([*DEMO, "--confidence", "95"], "--confidence: 95 is out of range"),
    ([*DEMO, "--min-agreement", "2"], "--min-agreement: 2 is out of range"),
    ([*DEMO, "--min-confidence", "2"], "--min-confidence: 2 is out of range"),  # the deprecated spelling too
    ([*CAL, "--k-shot", "-1"], "--k-shot: -1 is out of range; use an integer >= 0"),
    ([*DEMO, "--k-shot", "-2"], "--k-shot: -2 is out of range"),
    ([*CAL, "--seed", "-3"], "--seed: -3 is out of range"),
    ([*DEMO, "--wallclock-prompts", "-1"], "--wallclock-prompts: -1 is out of range"),
    ([*EVAL, "--wallclock-prompts", "-1"], "--wallclock-prompts: -1 is out of range"),
    ([*CAL, "--template", "fancy"], "--template: invalid choice: 'fancy'"),
    ([*DEMO, "--template", "fancy"], "--template: invalid choice: 'fancy'"),
    ([*CAL, "--encoding", "klingon"], "--encoding: unknown encoding 'klingon'"),
    ([*CAL, "--label-words", "neg=", "pos=good"], "--label-words: label word 'neg=' is blank"),
    ([*CAL, "--label-words", " ", "good"], "--label-words: label word ' ' is blank"),
    ([*CAL, "--text-column", ""], "--text-column: --text-column must not be blank"),
    ([*CAL, "--model", "{folder}"], "--model: .* is not a Hugging Face model directory"),
    ([*CAL, "--model", "{missing}.gguf"], "--model: GGUF file not found"),
    (["calibrate", "--task", "{missing}", "--out-dir", "{out}"], "--task: task file not found"),
    (["calibrate", "--task", "{folder}", "--out-dir", "{out}"], "--task: .* is not a task file"),
    (["calibrate", "--task", "{csv}"], "the following arguments are required: --out-dir"),
    (["calibrate", "--task", "{csv}", "--out-dir", "{file}"], "--out-dir: .* is an existing file; the output is a"),
    (["calibrate", "--task", "{csv}", "--out-dir", "{under_file}"], "--out-dir: cannot create .* is a file, not a"),
    (["calibrate", "--task", "{csv}", "--out", "{folder}"], "--out: .* is a folder: give the classifier file's path"),
    (["calibrate", "--task", "{csv}", "--out", "{under_file}"], "--out: cannot create .* is a file, not a folder"),
    ([*CAL, "--out", "{clf}"], "argument --out: not allowed with argument --out-dir"),
    ([*CAL, "--readout", "probe", "--vocab", "full"], "--readout probe answers over the label tokens"),
    ([*CAL, "--label-bias", "median"], "--label-bias: invalid choice: 'median'"),
    ([*CAL, "--method", "tree"], "--method: invalid choice: 'tree'"),
    ([*DEMO, "--out-dir", "{file}"], "--out-dir: .* is an existing file; the output is a folder"),
    ([*DEMO, "--out", "{file}"], "--out: .* is an existing file; the output is a folder"),
    ([*EVAL, "--out-dir", "{file}"], "--out-dir: .* is an existing file"),
    (["eval", "--task", "{csv}", "--classifier", "{folder}"], "--classifier: .* is a folder without classifier.json"),
    (["eval", "--task", "{csv}", "--classifier", "{missing}"], "--classifier: classifier file not found"),
    (["calibrate", "--task", "tweet-sentiment", "--out-dir", "{out}", "--text-column", "t"], "applies to task files"),
    ([*CAL, "--min-agreement", "0.5"], "--min-agreement applies to the tweet tasks only"),
    ([*EVAL, "--min-agreement", "0.5"], "--min-agreement applies to the tweet tasks only"),
    (["calibrate", "--out-dir", "{out}"], "the following arguments are required: --task"),
]


@pytest.mark.parametrize(
    ("argv", "match"), BAD_ARGS, ids=[" ".join(a).replace("{", "").replace("}", "") for a, _ in BAD_ARGS]
)
def test_bad_arguments_are_one_line_errors_before_any_work(files, no_model, capsys, argv, match):
    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2
    line = _error_line(capsys, argv[0])
    import re

    assert re.search(match, line), line


def test_help_still_exits_zero(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--classifier" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "calibrate", "eval"])
def test_help_shows_only_the_current_spellings(capsys, command):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--out-dir" in text and "--min-agreement" in text
    for old in ("--out ", "--bias", "--min-confidence", "--exit-head"):
        assert old not in text, old


# -- deprecated spellings: they parse as the new ones and print one warning line ------------------------------
DEPRECATED = [
    (["demo", "--out", "{out}"], ["demo", "--out-dir", "{out}"]),
    (["demo", "--bias", "mean"], ["demo", "--label-bias", "mean"]),
    (["demo", "--min-confidence", "0.5"], ["demo", "--min-agreement", "0.5"]),
    ([*CAL, "--bias", "none"], [*CAL, "--label-bias", "none"]),
    ([*CAL, "--exit-head", "probe"], [*CAL, "--readout", "probe"]),
    (
        ["calibrate", "--task", "tweet-sentiment", "--out-dir", "{out}", "--min-confidence", "0.8"],
        ["calibrate", "--task", "tweet-sentiment", "--out-dir", "{out}", "--min-agreement", "0.8"],
    ),
    (
        ["eval", "--task", "tweet-sentiment", "--classifier", "{file}", "--min-confidence", "0"],
        ["eval", "--task", "tweet-sentiment", "--classifier", "{file}", "--min-agreement", "0"],
    ),
]


@pytest.mark.parametrize(("old", "new"), DEPRECATED, ids=[f"{o[0]} {o[-2]}" for o, _ in DEPRECATED])
def test_deprecated_spellings_still_work_and_warn(files, capsys, old, new):
    old, new = [[a.format(**files) for a in argv] for argv in (old, new)]
    expected = vars(build_parser().parse_args(new))
    assert capsys.readouterr().err == ""  # the new spelling is silent
    assert vars(build_parser().parse_args(old)) == expected
    (line,) = capsys.readouterr().err.strip().splitlines()
    old_option = old[-2]
    new_option = next(a for a in new if a.startswith("--") and a not in old)
    assert line.startswith(f"adainfer {old[0]}: warning: {old_option} is deprecated"), line
    assert f"use {new_option}" in line, line


def test_calibrate_out_file_is_a_deprecated_spelling_of_out_dir(files, capsys):
    args = build_parser().parse_args(["calibrate", "--task", files["csv"], "--out", files["clf"]])
    assert args.out_file == files["clf"] and args.out_dir is None
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("adainfer calibrate: warning: --out is deprecated") and "use --out-dir DIR" in line


def test_eval_takes_the_classifier_file_or_its_folder(files):
    inside = str(Path(files["folder"]) / "classifier.json")
    _write_classifier(Path(inside))
    base = ["eval", "--task", files["csv"], "--classifier"]
    assert build_parser().parse_args([*base, files["folder"]]).classifier == inside
    assert build_parser().parse_args([*base, files["file"]]).classifier == files["file"]


def _write_classifier(path, **edits):
    data = {
        "format": "adainfer.StopClassifier",
        "version": 1,
        "model": {"model_type": "llama", "num_hidden_layers": 4, "vocab_size": 320, "hidden_size": 64},
        "method": "svm",
        "target": "consistency",
        "vocab_mode": "labels",
        "weights": {"top_prob": 1.0, "gap": 1.0, "layer": 0.0},
        "intercept": 0.0,
        "threshold": 0.5,
        "min_layer": 2,
        "label_token_ids": [21, 22],
    }
    data.update(edits)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({"info": "tweet-sentiment"}, "info must be a JSON object"),
        ({"info": {"task": {"sizes": {"test": "300"}}}}, "info.task.sizes.test must be a positive int"),
        ({"info": {"task": {"k_shot": [2]}}}, "info.task.k_shot must be int"),
        ({"weights": {"top_prob": 1e39, "gap": 1.0, "layer": 0.0}}, "weights.top_prob 1e.39 does not fit in float32"),
    ],
)
def test_bad_classifier_files_are_one_line_errors_before_the_model_loads(tmp_path, no_model, capsys, edits, match):
    clf = _write_classifier(tmp_path / "clf.json", **edits)
    task = str(_reviews(tmp_path / "reviews.csv"))
    assert main(["eval", "--task", task, "--classifier", clf]) == 2
    import re

    assert re.search(match, _error_line(capsys, "eval"))


def test_task_file_without_rows_is_a_clear_error(tmp_path, no_model, capsys):
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    assert main(["calibrate", "--task", str(header), "--out-dir", str(tmp_path / "c")]) == 2
    assert "header.csv has a header row but no examples" in _error_line(capsys, "calibrate")


# -- calibrate and eval on a tiny model directory -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model")))


def test_eval_records_the_settings_it_ran_with(tiny_dir, tmp_path, capsys):
    data = str(_reviews(tmp_path / "reviews.csv"))
    clf_dir = tmp_path / "new" / "folder"  # created
    common = ["--model", tiny_dir, "--task", data, "--text-column", "review", "--label-column", "stars"]
    cal = ["--label-words", "neg=bad", "pos=good", "--k-shot", "2", "--template", "instruct", "--seed", "3"]
    sizes = ["--n-calibration", "12", "--n-heldout", "12", "--n-test", "8"]
    rc = main(["calibrate", *common, *cal, *sizes, "--out-dir", str(clf_dir), "--budget", "0.2", "--method", "gap"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "warning" not in out.err and f"wrote {clf_dir / 'classifier.json'}" in out.out
    stored = StopClassifier.load(clf_dir / "classifier.json").info["task"]
    assert stored["k_shot"] == 2 and stored["template"] == "instruct" and stored["seed"] == 3
    out = tmp_path / "out"
    # eval reads the folder calibrate wrote
    evaluate = ["eval", *common, "--classifier", str(clf_dir), "--out-dir", str(out), "--no-plots"]
    evaluate += ["--wallclock-prompts", "0"]
    rc = main([*evaluate, "--batch-size", "5"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    settings = result["settings"]
    # the calibrated task settings, not RunSettings' defaults (4-shot, plain, no label words, batch 32)
    assert settings["k_shot"] == 2 and settings["template"] == "instruct" and settings["seed"] == 3
    assert settings["label_words"] == [" bad", " good"]
    assert settings["sizes"] == {"calibration": 12, "heldout": 12, "test": 8}
    assert settings["batch_size"] == 5 and settings["budget"] == 0.2 and settings["min_confidence"] is None
    assert settings["label_bias_estimator"] == result["rows"][0]["classifier"]["label_bias_estimator"]
    task = result["task"]
    assert task["label_words_arg"] == ["neg=bad", "pos=good"] and task["text_column"] == "review"
    assert result["classifier_file"] == str(clf_dir / "classifier.json")
    # an option given to eval wins over the stored one, and is what gets recorded
    rc = main([*evaluate, "--k-shot", "1", "--n-test", "4"])
    assert rc == 0, capsys.readouterr().err
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["k_shot"] == 1 and settings["sizes"]["test"] == 4 and settings["template"] == "instruct"


def test_calibrate_out_file_still_writes_that_file_and_warns(tiny_dir, tmp_path, capsys):
    data = str(_reviews(tmp_path / "reviews.csv"))
    clf_path = tmp_path / "clf.json"
    argv = ["calibrate", "--model", tiny_dir, "--task", data, "--text-column", "review", "--label-column", "stars"]
    argv += ["--n-calibration", "12", "--n-heldout", "12", "--n-test", "8", "--method", "gap", "--budget", "0.2"]
    assert main([*argv, "--out", str(clf_path), "--bias", "mean"]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "warning" in line]
    assert warnings == [
        "adainfer calibrate: warning: --out is deprecated and will be removed in the next release; "
        "use --out-dir DIR (it writes DIR/classifier.json)",
        "adainfer calibrate: warning: --bias is deprecated and will be removed in the next release; use --label-bias",
    ], out.err
    assert f"wrote {clf_path}" in out.out
    clf = StopClassifier.load(clf_path)
    assert clf.label_bias_estimator == "mean"
    assert not list(tmp_path.glob("**/classifier.json"))  # the old meaning: that file, no folder


def test_calibrate_by_default_shares_what_the_test_split_leaves_between_calibration_and_heldout(
    tiny_dir, tmp_path, capsys
):
    data = str(_reviews(tmp_path / "reviews.csv", n=41))  # 41 per class: 8 demo candidates, 4 test, 29 left
    argv = ["calibrate", "--model", tiny_dir, "--task", data, "--text-column", "review", "--label-column", "stars"]
    argv += ["--n-test", "8", "--k-shot", "2", "--method", "gap", "--budget", "0.2", "--out-dir", str(tmp_path / "c")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "calibration 28, heldout 28, test 8" in capsys.readouterr().out  # 14 + 14 per class, the odd one unused
    stored = StopClassifier.load(tmp_path / "c" / "classifier.json").info["task"]["sizes"]
    assert stored == {"calibration": 28, "heldout": 28, "test": 8}
