"""The README's Python examples run as written, in order, in one namespace, on the bundled real
model (offline), in a scratch folder.

Each ```python block is executed verbatim. The only set-up is what the README asks the reader to
have: for the lm-evaluation-harness block, a local multiple-choice task folder (`tasks/my_task.yaml`)
and the classifier its bash block calibrates (`adainfer calibrate ... --out-dir clf-mc/`), run here
through the CLI's own `main` with the README's arguments.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks(kind: str) -> list[str]:
    """The README's fenced blocks of one kind (``python``, ``bash``), in order."""
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == kind]


def _write_my_task(folder: Path) -> None:
    """A two-choice sentiment task over real tweets (the bundled corpus), as an lm-eval YAML + JSONL."""
    import csv

    from adainfer.app.datasets import tweet_csv_path

    with open(tweet_csv_path(), encoding="latin-1", newline="") as f:
        rows = [r for r in csv.DictReader(f) if len(r["text"]) < 200]
    by_label = [[r for r in rows if r["sentiment"] == name][:26] for name in ("negative", "positive")]
    rows = [r for pair in zip(*by_label, strict=True) for r in pair]  # balanced and interleaved: 52 tweets
    docs = {"train": [], "test": []}
    for split, chunk in (("train", rows[:40]), ("test", rows[40:52])):
        docs[split] = [{"text": r["text"], "label": int(r["sentiment"] == "positive")} for r in chunk]
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in docs.items():
        (folder / f"my_task_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    (folder / "my_task.yaml").write_text(
        "task: my_task\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {folder.resolve() / 'my_task_train.jsonl'}\n"
        f"    test: {folder.resolve() / 'my_task_test.jsonl'}\n"
        "training_split: train\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Tweet: {{text}}\\nSentiment:"\n'
        'doc_to_choice: ["negative", "positive"]\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )


def _readme_calibrate_argv(task: str) -> list[str]:
    """The README's `adainfer calibrate` line for ``task``, as arguments of the CLI's `main`."""
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["adainfer", "calibrate"] and f"--task {task}" in " ".join(words):
                return words[1:]
    raise AssertionError(f"the README has no `adainfer calibrate --task {task}` line")


def test_the_readme_has_the_examples_this_test_runs():
    blocks = readme_blocks("python")
    assert len(blocks) >= 5, len(blocks)
    assert "import adainfer\n" in blocks[0] and "adainfer.calibrate(" in blocks[0]
    assert any("lm_eval.simple_evaluate" in b for b in blocks)


@pytest.mark.slow
def test_every_python_example_of_the_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    from adainfer.app.cli import main as adainfer_main

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(readme_blocks("python")):
        if "from vllm import" in block:
            continue  # the vLLM example needs .venv-vllm: tests/vllm_plugin/test_vllm_readme.py runs it
        if "lm_eval" in block:
            _write_my_task(tmp_path / "tasks")
            argv = [*_readme_calibrate_argv("lmeval:my_task"), "--n-calibration", "12", "--n-heldout", "12"]
            assert adainfer_main([*argv, "--n-test", "12"]) == 0, capsys.readouterr().err
            assert (tmp_path / "clf-mc" / "classifier.json").exists()
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # the block and the error, so the README can be fixed from the log
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{block}") from exc

    # What the examples claim, checked on what they produced.
    clf, result = namespace["clf"], namespace["result"]
    assert (tmp_path / "clf" / "classifier.json").exists()
    assert clf.identity.model_type == "llama" and clf.n_layers == 30
    assert len(result) == 1 and result.labels[0] in clf.label_words
    assert 1 <= int(result.exit_layers[0]) <= 30
    metrics = namespace["report"].metrics
    assert metrics["runtime_prompts"] == 50
    signals = namespace["signals"]
    assert signals.top_prob.shape == signals.gap.shape == signals.argmax.shape == (4,)
    assert namespace["stop_rule"] is not None and namespace["head"].vocab_subset is not None
    lm_results = namespace["results"]["adainfer"]["tasks"]["my_task"]
    assert 1 <= lm_results["mean_exit_layer"] <= 30
