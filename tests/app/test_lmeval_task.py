"""The lmeval: task source of `adainfer calibrate` / `eval`: an lm-eval multiple-choice task as a
ClassificationTask with lm-eval's own contexts, label words and gold labels (no model needed)."""

from __future__ import annotations

import pytest
from adainfer.app.lmeval_task import classification_task, load_lmeval_task, load_lmeval_task_object
from lmeval_helpers import CHOICES, LABELS, word_tokenizer, write_task


def test_an_lm_eval_task_becomes_a_classification_task_with_lm_evals_own_contexts(tmp_path):
    rows = write_task(tmp_path, doc_to_text="Text: {{text}}\\nLabel:")
    task = load_lmeval_task("lmeval:tiny_mc", tmp_path, {"calibration": 9, "heldout": 6, "test": 6}, seed=0)
    assert task.name == "lmeval:tiny_mc" and task.label_names == tuple(CHOICES)
    assert task.label_words == (" neg", " pos", " neu")  # target_delimiter + choice
    assert [len(task.split(s)) for s in ("calibration", "heldout", "test")] == [9, 6, 6]
    rendered = task.render(word_tokenizer())
    assert rendered.label_token_ids == tuple(LABELS)
    # the docs of the training split only (the test split is what lm_eval evaluates), with lm-eval's contexts
    lm_task = load_lmeval_task_object("tiny_mc", tmp_path)
    contexts = {lm_task.fewshot_context(d, 0): d["label"] for d in lm_task.training_docs()}
    assert len(contexts) == len(rows["train"])
    for split in ("calibration", "heldout", "test"):
        for prompt, label in zip(rendered.prompts(split), rendered.labels(split), strict=True):
            assert contexts[prompt] == label
    picked = load_lmeval_task("lmeval:tiny_mc:test", tmp_path, {"calibration": 3, "heldout": 3, "test": 3})
    test_contexts = {lm_task.fewshot_context(d, 0) for d in lm_task.test_docs()}
    assert set(picked.render(word_tokenizer()).prompts("calibration")) <= test_contexts


def test_load_task_routes_lmeval_specs_and_refuses_options_the_yaml_defines(tmp_path):
    from adainfer.app.tasks import load_task

    write_task(tmp_path)
    sizes = {"calibration": 9, "heldout": 6, "test": 6}
    task = load_task("lmeval:tiny_mc", include_path=tmp_path, sizes=sizes, seed=1)
    assert task == load_lmeval_task("lmeval:tiny_mc", tmp_path, sizes, seed=1)
    with pytest.raises(ValueError, match="k_shot, template do not apply to lm-eval tasks"):
        load_task("lmeval:tiny_mc", include_path=tmp_path, k_shot=2, template="plain")


def test_lm_eval_tasks_the_source_cannot_use_are_refused(tmp_path):
    write_task(tmp_path / "gen", name="tiny_gen", output_type="generate_until")
    with pytest.raises(ValueError, match="output_type 'generate_until': calibration needs a multiple_choice task"):
        load_lmeval_task("lmeval:tiny_gen", tmp_path / "gen")
    with pytest.raises(ValueError, match="no lm-eval task 'nope' in"):
        load_lmeval_task("lmeval:nope", tmp_path / "gen")
    write_task(tmp_path / "mc")
    lm_task = load_lmeval_task_object("tiny_mc", tmp_path / "mc")
    lm_task.config.training_split = None
    with pytest.raises(ValueError, match=r"has only the split it evaluates \('test'\).*lmeval:tiny_mc:test"):
        classification_task(lm_task, {"calibration": 3, "heldout": 3, "test": 3})


def test_calibrate_cli_rejects_options_that_lm_eval_tasks_define_themselves(tmp_path, capsys):
    from adainfer.app.cli import main as adainfer_main

    write_task(tmp_path)
    argv = ["calibrate", "--task", "lmeval:tiny_mc", "--include-path", str(tmp_path), "--out-dir", str(tmp_path / "c")]
    assert adainfer_main([*argv, "--k-shot", "2"]) == 2
    assert "--k-shot do not apply to lm-eval tasks" in capsys.readouterr().err


def test_calibrate_then_eval_on_an_lm_eval_task_from_the_command_line(tmp_path, capsys, record_classify):
    """`adainfer calibrate --task lmeval:NAME --include-path DIR`, then `eval` with the stored settings (no
    --include-path again), on a tiny model saved as a Hugging Face folder."""
    import json

    import numpy as np
    from adainfer.app.cli import main
    from adainfer.calibration.classifier import StopClassifier
    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    write_task(tmp_path / "tasks", n_train=60, n_test=6)
    model = ["--model", str(tmp_path / "model"), "--task", "lmeval:tiny_mc", "--batch-size", "16"]
    sizes = ["--n-calibration", "24", "--n-heldout", "18", "--n-test", "18", "--budget", "0.2"]
    clf_path = tmp_path / "clf" / "classifier.json"
    rc = main(
        ["calibrate", *model, "--include-path", str(tmp_path / "tasks"), "--out-dir", str(clf_path.parent), *sizes]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "task lmeval:tiny_mc: labels neg/pos/neu -> tokens ' neg'/' pos'/' neu' [5, 17, 40]" in out.out
    clf = StopClassifier.load(clf_path)
    assert clf.label_token_ids == tuple(LABELS)
    assert clf.info["task"]["include_path"] == str((tmp_path / "tasks").resolve())
    runs = record_classify()  # the runtime's own answers, as `eval` reads them, recorded to score them here
    rc = main(["eval", *model, "--classifier", str(clf_path), "--out-dir", str(tmp_path / "out"), "--no-plots"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics["n"] == 18 and metrics["runtime_prompts"] == 18
    # runtime accuracy = mean(runtime answer == gold), gold from lm-eval's own docs, and the runtime's
    # pruning ratio = 1 - mean exit / L, recomputed from the runtime's rows
    (prompts, result), *_ = runs
    lm_task = load_lmeval_task_object("tiny_mc", tmp_path / "tasks")
    gold_of = {lm_task.fewshot_context(d, 0): d["label"] for d in lm_task.training_docs()}
    gold = np.array([gold_of[p] for p in prompts])
    assert len(runs) == 1 and len(prompts) == 18
    assert metrics["runtime_accuracy"] == pytest.approx(float(np.mean(result.label_index == gold)), abs=1e-12)
    assert metrics["runtime_pruning_ratio"] == pytest.approx(1.0 - float(np.mean(result.exit_layers)) / 4, abs=1e-12)
