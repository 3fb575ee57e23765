"""End to end on the bundled real model, small splits: the demo pipeline produces a complete table,
results.json and PNGs; ``calibrate`` then ``eval`` on a user CSV; clear CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adainfer.app.cli import main
from adainfer.app.pipeline import NOT_MEASURED, TABLE_COLUMNS, RunSettings, run_demo, runtime_answers
from adainfer.calibration.classifier import StopClassifier
from adainfer.calibration.evaluate import METRIC_KEYS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_pipeline_on_the_bundled_model_produces_a_complete_table(bundled, tmp_path):
    from rich.console import Console

    settings = RunSettings(k_shot=1, sizes={"calibration": 24, "heldout": 16, "test": 24}, budget=0.05, batch_size=24)
    console = Console(width=220, record=True)
    runtime_runs = []  # (prompts, the runtime's answers and exit layers), recorded to score them here

    def recorded_runtime(model, tokenizer, prompts, clf, batch_size):
        run = runtime_answers(model, tokenizer, prompts, clf, batch_size)
        runtime_runs.append((list(prompts), run))
        return run

    payload = run_demo(bundled, settings, tmp_path, console=console, progress=False, measure_runtime=recorded_runtime)
    text = console.export_text()
    for header, _ in TABLE_COLUMNS:
        assert header in text
    assert NOT_MEASURED in text and "wall clock: not measured" in text

    table = payload["table"]
    assert table["columns"] == [h for h, _ in TABLE_COLUMNS]
    assert [r[0] for r in table["rows"]] == [r["variant"]["name"] for r in payload["rows"]]
    assert len(table["rows"]) == 11
    headers = [h for h, _ in TABLE_COLUMNS]
    runtime_cols = {headers.index("runtime acc"), headers.index("= sim")}
    for r, cells in enumerate(table["rows"]):
        assert len(cells) == len(TABLE_COLUMNS) and all(c for c in cells)
        assert cells[-1] == NOT_MEASURED  # no WallclockFn given: never estimated
        # every algorithmic column has a value ("of oracle" is n/a only when the oracle saves nothing)
        of_oracle = headers.index("of oracle")
        assert all(c != "n/a" for i, c in enumerate(cells[1:-1], start=1) if i not in {of_oracle, *runtime_cols})
        # the runtime's own answers are measured for the main row only
        is_main = payload["rows"][r]["variant"]["main"]
        assert all((cells[i] != "n/a") == is_main for i in runtime_cols)
    full_accuracy_by_bias = {}
    for row in payload["rows"]:
        m = row["metrics"]
        assert set(m) == set(METRIC_KEYS)
        for key in ("full_accuracy", "adainfer_accuracy", "agreement"):
            assert abs(m[key] * m["n"] - round(m[key] * m["n"])) < 1e-9, f"{key} = {m[key]} is not a count of {m['n']}"
        # exit and full answers differ on a share 1 - agreement of the rows: the accuracies by at most that
        assert abs(m["adainfer_accuracy"] - m["full_accuracy"]) <= 1.0 - m["agreement"] + 1e-9, m
        # the full model's answer does not depend on the stop rule, only on the label bias at layer L
        clf_dict = row["classifier"]
        bias_at_l = None if clf_dict["label_bias"] is None else tuple(clf_dict["label_bias"][-1])
        full_accuracy_by_bias.setdefault((clf_dict["vocab_mode"], bias_at_l), []).append(m["full_accuracy"])
        assert 1.0 <= m["mean_exit_layer"] <= 30.0 and m["pruning_ratio"] == pytest.approx(
            1 - m["mean_exit_layer"] / 30
        )
        assert m["wallclock_full_s"] is None and m["speedup"] is None
        info = row["classifier"]["info"]
        assert info["heldout_disagreement"] <= 0.05  # the budget holds where it was chosen
    assert all(len(set(accs)) == 1 for accs in full_accuracy_by_bias.values()), full_accuracy_by_bias
    assert max(map(len, full_accuracy_by_bias.values())) > 1, "no two rows share a label bias: nothing compared"
    (main_row,) = [r for r in payload["rows"] if r["variant"]["main"]]
    assert main_row["classifier"]["label_bias_estimator"] == "balanced"
    # both exit heads are in the table; the main row is the rule chosen on the calibration split
    heads = {r["variant"]["name"]: r["classifier"]["readout"] for r in payload["rows"]}
    assert heads["svm + bias"] == "lens" and heads["probe svm + bias"] == "probe"
    main_clf = main_row["classifier"]
    assert main_row["variant"]["name"] == f"{main_clf['method']} {main_clf['readout']} + bias (chosen)"
    assert payload["rows"][0] == main_row and main_clf["method"] in ("gap", "svm")
    # the correction is applied to the full model's answer alike: raw and corrected rows differ there
    assert {r["variant"]["name"] for r in payload["rows"]} >= {"svm + bias", "svm, raw", "gap + bias"}

    saved = json.loads((tmp_path / "results.json").read_text())
    assert next(r for r in saved["rows"] if r["variant"]["main"])["metrics"] == main_row["metrics"]
    assert len(saved["per_layer"]) == 30 and saved["budget_sweep"]
    clf = StopClassifier.load(tmp_path / "classifier.json")
    clf.check_compatible(bundled.model)
    assert clf.label_token_ids == (3524, 2731)
    for png in ("exit_layers.png", "accuracy_vs_savings.png", "per_layer.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000

    # The table's answer is the runtime's: the main row's answers, read through the patched model,
    # equal the simulation's (up to numerics right at the threshold) ...
    m = main_row["metrics"]
    assert m["runtime_prompts"] == 24 and m["runtime_matches_simulation"] >= 0.95
    assert abs(m["runtime_accuracy"] - m["adainfer_accuracy"]) <= 0.05
    # ... and the runtime metrics are those of the runtime's rows: accuracy = mean(answer == gold),
    # pruning ratio = 1 - mean exit / L (the runtime runs for the main row only)
    ((prompts, run),) = runtime_runs
    rendered = _test_task(payload).render(bundled.tokenizer)
    assert prompts == rendered.prompts("test")
    gold = np.asarray(rendered.labels("test"))
    assert m["runtime_accuracy"] == pytest.approx(float(np.mean(np.asarray(run["answers"]) == gold)), abs=1e-12)
    assert m["runtime_pruning_ratio"] == pytest.approx(1.0 - float(np.mean(run["exit_layers"])) / 30, abs=1e-12)
    # ... and every read-out of that answer agrees with the others.
    _check_read_outs_agree(bundled, clf, payload)


def _test_task(payload):
    """The demo's task, rebuilt from the settings its results carry."""
    from adainfer.app.datasets import tweet_sentiment

    task_settings = payload["task"]
    return tweet_sentiment(
        k_shot=task_settings["k_shot"],
        template=task_settings["template"],
        sizes=task_settings["sizes"],
        seed=task_settings["seed"],
        min_confidence=task_settings["min_confidence"],
    )


def _check_read_outs_agree(bundled, clf, payload):
    import adainfer
    import torch
    from adainfer.runtime.wallclock import padded_batches

    task = _test_task(payload)
    rendered = task.render(bundled.tokenizer)
    texts = [e.text for e in task.split("test")][:8]
    result = adainfer.classify(
        bundled.model, bundled.tokenizer, texts, clf, prompt=rendered, batch_size=8, correct_full_depth=True
    )
    labels = torch.tensor(clf.label_token_ids)
    (batch,) = padded_batches(bundled.tokenizer, [rendered.prompt(t) for t in texts], 8)
    config = adainfer.AdaInferConfig(correct_full_depth=True)
    with torch.inference_mode(), adainfer.patched(bundled.model, clf, config) as handle:
        logits = bundled.model(**batch, logits_to_keep=1).logits[:, -1]
        stats = handle.last_stats
        generated = bundled.model.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1]
    assert logits[:, labels].argmax(-1).tolist() == result.label_index.tolist() == stats.answer_label.tolist()
    assert generated.tolist() == labels[stats.answer_label].tolist() == stats.answer_token.tolist()
    assert stats.exit_layers.tolist() == result.exit_layers.tolist()
    assert result.labels == [clf.label_words[i] for i in result.label_index]


def _write_reviews(path):
    good = ["I love it", "great value", "works perfectly", "amazing quality", "very happy with it", "superb"]
    bad = ["it broke", "waste of money", "terrible support", "awful smell", "very disappointed", "useless"]
    lines = ["review,stars"]
    for i in range(4):
        lines += [f'"{t} (#{i})",pos' for t in good] + [f'"{t} (#{i})",neg' for t in bad]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_calibrate_then_eval_on_a_user_csv(tmp_path, capsys, record_classify):
    data = tmp_path / "reviews.csv"
    _write_reviews(data)
    clf_path = tmp_path / "clf" / "classifier.json"
    sizes = ["--n-calibration", "12", "--n-heldout", "12", "--n-test", "8"]  # 24 per class: 8 demo candidates
    common = ["--model", "bundled", "--task", str(data), "--text-column", "review", "--label-column", "stars"]
    common += ["--label-words", "neg=bad", "pos=good", "--k-shot", "2", "--batch-size", "16"]
    rc = main(["calibrate", *common, "--out-dir", str(clf_path.parent), "--budget", "0.1", *sizes])
    rc = rc or 0
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "labels neg/pos -> tokens ' bad'/' good'" in out.out
    clf = StopClassifier.load(clf_path)
    assert clf.label_words == (" bad", " good") and clf.info["task"]["sizes"]["calibration"] == 12
    runs = record_classify()  # the runtime's own answers, as `eval` reads them, recorded to score them here
    rc = main(["eval", *common, "--classifier", str(clf_path.parent), "--out-dir", str(tmp_path / "out"), "--no-plots"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "AdaInfer acc" in out.out and "wall clock: " in out.out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    m = result["rows"][0]["metrics"]
    assert m["n"] > 0
    # `eval` times the real runtime on every test prompt (full model vs patched, same batches)
    assert m["wallclock_prompts"] == m["n"] and m["wallclock_full_s"] > 0 and m["wallclock_adainfer_s"] > 0
    assert m["speedup"] == pytest.approx(m["wallclock_full_s"] / m["wallclock_adainfer_s"])
    assert m["runtime_prompts"] == m["n"]
    # runtime accuracy = mean(answer == gold), gold read back from the CSV (the text ends each prompt);
    # runtime pruning ratio = 1 - mean exit / L; both from the runtime's rows
    ((prompts, res),) = runs
    rows = [line.rsplit(",", 1) for line in data.read_text().splitlines()[1:]]
    label_of = {text.strip('"'): int(stars == "pos") for text, stars in rows}  # label index: neg (" bad") 0
    gold = [label_of[max(label_of, key=prompt.rfind)] for prompt in prompts]  # the text that ends the prompt
    assert len(prompts) == m["n"] == len(res.label_index)
    assert m["runtime_accuracy"] == pytest.approx(float(np.mean(res.label_index == np.asarray(gold))), abs=1e-12)
    assert m["runtime_pruning_ratio"] == pytest.approx(1.0 - float(np.mean(res.exit_layers)) / 30, abs=1e-12)
    # exits differ from the simulated ones on a share 1 - runtime_exit_match, each by at most L - 1 layers
    assert abs(m["runtime_exit_match"] * m["n"] - round(m["runtime_exit_match"] * m["n"])) < 1e-9
    bound = (1.0 - m["runtime_exit_match"]) * 29 / 30
    assert abs(m["runtime_pruning_ratio"] - m["pruning_ratio"]) <= bound + 1e-9, m


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = main(["calibrate", "--task", "no-such-task", "--out-dir", str(tmp_path / "c")])
    assert rc == 2 and "unknown task 'no-such-task'" in capsys.readouterr().err
    data = tmp_path / "d.csv"
    data.write_text("body,label\nhello,a\nworld,b\n")
    rc = main(["calibrate", "--task", str(data), "--out-dir", str(tmp_path / "c")])
    assert rc == 2 and "no text column 'text' (columns: body, label)" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "adainfer.StopClassifier", "version": 1}')
    rc = main(["eval", "--task", "tweet-sentiment", "--classifier", str(bad)])
    assert rc == 2 and "missing key(s): model" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_refuses_a_classifier_of_another_model(tmp_path, capsys):
    clf = StopClassifier.from_dict(
        {
            "format": "adainfer.StopClassifier",
            "version": 1,
            "model": {"model_type": "llama", "num_hidden_layers": 32, "vocab_size": 32000, "hidden_size": 4096},
            "method": "svm",
            "target": "consistency",
            "vocab_mode": "labels",
            "weights": {"top_prob": 1.0, "gap": 1.0, "layer": 0.0},
            "intercept": 0.0,
            "threshold": 0.5,
            "min_layer": 20,
            "label_token_ids": [1, 2],
        }
    )
    path = tmp_path / "other.json"
    clf.save(path)
    rc = main(["eval", "--task", "tweet-sentiment", "--classifier", str(path), "--n-test", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "classifier was fitted for a 32-layer llama model with hidden size 4096 and vocab 32000" in err
    assert "this model is a 30-layer llama model" in err
