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
    argv = ["calibrate", "--task", "lmeval:tiny_mc", "--include-path", str(tmp_path), "--out", str(tmp_path / "c.json")]
    assert adainfer_main([*argv, "--k-shot", "2"]) == 2
    assert "--k-shot do not apply to lm-eval tasks" in capsys.readouterr().err
