"""The lm-evaluation-harness model ``adainfer`` (``adainfer.app.lmeval_model``).

Semantics on a tiny random Llama with a word-level tokenizer and a hand-built 3-label classifier
(some contexts stop early, some run every layer): each multiple-choice context runs once with exits
and every choice is scored from the answer the patched model delivers (``adainfer.classify``'s);
requests the classifier cannot answer run at full depth with exits off (HFLM's own scores) and are
counted; lm-eval's results carry the AdaInfer figures. One test on the bundled real model checks the
project's target: lm-eval's accuracy and layers saved equal the runtime's on the same prompts, with a
classifier calibrated from the lm-eval task itself (``adainfer calibrate --task lmeval:NAME``).
"""

from __future__ import annotations

import json
import math

import adainfer
import numpy as np
import pytest
import torch
from adainfer.app.lmeval_model import AdaInferLM, add_to_results, main
from adainfer.calibration.classifier import StopClassifier
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lmeval_helpers import CHOICES, LABELS, random_contexts, word_tokenizer, write_task
from tiny_models import label_classifier, tiny_llama


def _classifier(model) -> StopClassifier:
    """Stops a row when its top label probability (with a small per-layer label bias) passes 0.4:
    on the contexts below some rows stop at layers 1-3 and some run all 4 (asserted)."""
    return label_classifier(model, LABELS, [" " + w for w in LABELS.values()])


def _requests(contexts, choices=CHOICES, task="t", kind="loglikelihood") -> list[Instance]:
    return [
        Instance(kind, {}, (ctx, " " + c), i, (task, d, 1))
        for d, ctx in enumerate(contexts)
        for i, c in enumerate(choices)
    ]


def _lm(**kwargs) -> AdaInferLM:
    model = tiny_llama()
    return AdaInferLM(
        pretrained=model, tokenizer=word_tokenizer(), classifier=_classifier(model), device="cpu", **kwargs
    )


def _plain_hflm(batch_size: int = 4) -> HFLM:
    """lm-eval's own HFLM on an unpatched copy of the same tiny model."""
    return HFLM(pretrained=tiny_llama(), tokenizer=word_tokenizer(), batch_size=batch_size)


def test_registered_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    assert get_model("adainfer") is AdaInferLM


@pytest.mark.parametrize("correct_full_depth", [False, True])
def test_each_context_runs_once_and_every_choice_reads_the_delivered_answer(correct_full_depth):
    lm = _lm(batch_size=4, correct_full_depth=correct_full_depth)
    contexts = random_contexts()
    scores = np.array([s for s, _ in lm.loglikelihood(_requests(contexts))]).reshape(len(contexts), 3)
    greedy = np.array([g for _, g in lm.loglikelihood(_requests(contexts))]).reshape(len(contexts), 3)
    # one row per context (not per choice), in batches of 4: 3 forward passes per loglikelihood call
    history = list(lm.handle.history)[-3:]  # a bounded deque: no slicing
    assert [int(s.exit_layers.numel()) for s in history] == [4, 4, 2]

    ref_model, tok = tiny_llama(), word_tokenizer()
    clf = _classifier(ref_model)
    ref = adainfer.classify(ref_model, tok, contexts, clf, batch_size=4, correct_full_depth=correct_full_depth)
    exited = ref.exit_layers < 4
    assert exited.any() and (~exited).any(), ref.exit_layers
    # every choice is a label token: the scores are the delivered answer's label log-probabilities
    answered = exited | correct_full_depth
    np.testing.assert_allclose(scores[answered], np.log(ref.probs[answered]), rtol=1e-5, atol=1e-5)
    assert (scores.argmax(1) == ref.label_index).all()
    # is_greedy: the delivered answer is the argmax over the whole vocabulary (other tokens -inf)
    assert (greedy[answered].argmax(1) == ref.label_index[answered]).all() and (greedy[answered].sum(1) == 1).all()
    if not correct_full_depth:  # full-depth rows: the unpatched model's own log-softmax over the vocabulary
        with torch.inference_mode():
            for d in np.flatnonzero(~exited):
                ids = tok(contexts[d], return_tensors="pt")
                want = torch.log_softmax(ref_model(**ids).logits[0, -1].float(), -1)[list(LABELS)]
                np.testing.assert_allclose(scores[d], want.numpy(), rtol=1e-5, atol=1e-5)
    summary = lm.adainfer_summary()["tasks"]["t"]
    assert summary["contexts"] == 2 * len(contexts) and summary["requests"] == 6 * len(contexts)
    assert summary["mean_exit_layer"] == pytest.approx(ref.exit_layers.mean())
    assert summary["layers_saved"] == pytest.approx(ref.layers_saved)
    assert summary["exited_early"] == pytest.approx(exited.mean())
    assert summary["wallclock_s"] > 0 and summary["full_depth_requests"] == {}


def test_a_choice_that_is_no_label_token_runs_its_context_at_full_depth():
    """An exited row gives every non-label token -inf: such a context runs with exits off instead, as a
    whole (HFLM's own scores, so all its choices stay comparable); the others still exit."""
    contexts = random_contexts(6)
    mixed = _requests(contexts[:3], ["neg", "w99", "pos"]) + _requests(contexts[3:])
    lm = _lm(batch_size=4)
    with pytest.warns(UserWarning, match=r"not a label token \(choices \['w99'\].*run at full depth"):
        got = lm.loglikelihood(mixed)
    want = _plain_hflm().loglikelihood(mixed[:9])
    assert got[:9] == want, "bit-identical to lm-eval's HFLM on the unpatched model"
    assert all(math.isfinite(s) for s, _ in got)
    summary = lm.adainfer_summary()["tasks"]["t"]
    assert summary["full_depth_requests"] == {"not_a_label_token": 9}
    assert summary["contexts"] == 3 and summary["full_depth_wallclock_s"] > 0

    strict = _lm(other_requests="error")
    with pytest.raises(ValueError, match=r"cannot exit early \(not a label token.*other_requests=full_depth"):
        strict.loglikelihood(mixed)


def test_other_request_kinds_run_with_exits_off_and_are_counted():
    lm, plain = _lm(batch_size=4), _plain_hflm()
    contexts = random_contexts(4)
    multi = _requests(contexts, ["neg pos", "pos neg"])  # two-token continuations
    rolling = [Instance("loglikelihood_rolling", {}, (c,), 0, ("r", d, 1)) for d, c in enumerate(contexts)]
    gen_kwargs = {"until": ["</s>"], "max_gen_toks": 3, "do_sample": False}
    gen = [Instance("generate_until", {}, (c, dict(gen_kwargs)), 0, ("g", d, 1)) for d, c in enumerate(contexts)]
    with pytest.warns(UserWarning, match="multi token continuation"):
        assert lm.loglikelihood(multi) == plain.loglikelihood(multi)
    with pytest.warns(UserWarning, match="loglikelihood rolling"):
        assert lm.loglikelihood_rolling(rolling) == plain.loglikelihood_rolling(rolling)
    with pytest.warns(UserWarning, match="generate until"):
        assert lm.generate_until(gen) == plain.generate_until(gen)
    assert lm.handle.enabled, "exits are back on afterwards"
    tasks = lm.adainfer_summary()["tasks"]
    assert tasks["t"]["full_depth_requests"] == {"multi_token_continuation": 8} and tasks["t"]["contexts"] == 0
    assert tasks["r"]["full_depth_requests"] == {"loglikelihood_rolling": 4}
    assert tasks["g"]["full_depth_requests"] == {"generate_until": 4}
    with pytest.raises(ValueError, match="generate until"):
        _lm(other_requests="error").generate_until(gen)


def test_bad_model_args_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs model_args classifier=PATH"):
        AdaInferLM(pretrained=model, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="unknown model_args for the adainfer model: correct_full_dept"):
        _lm(correct_full_dept=True)
    with pytest.raises(ValueError, match="batch_size=auto is not supported"):
        _lm(batch_size="auto")
    with pytest.raises(ValueError, match="other_requests='skip' is not valid"):
        _lm(other_requests="skip")
    other = tiny_llama(layers=3)
    with pytest.raises(ValueError, match="classifier was fitted for a 4-layer llama model"):
        AdaInferLM(pretrained=other, tokenizer=word_tokenizer(), classifier=_classifier(model))


# --------------------------------------------------------------------------------------------
# Through lm-eval's evaluator and command line, on a local YAML + JSONL task


def test_simple_evaluate_reports_the_adainfer_figures_beside_the_metrics(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    rows = write_task(tmp_path)
    lm = _lm(batch_size=4, correct_full_depth=True)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, bootstrap_iters=0)
    ref_model = tiny_llama()
    contexts = [r["text"] for r in rows["test"]]
    ref = adainfer.classify(
        ref_model, word_tokenizer(), contexts, _classifier(ref_model), batch_size=4, correct_full_depth=True
    )
    gold = np.array([r["label"] for r in rows["test"]])
    # lm-eval's accuracy is the runtime's, and the figures the runtime's exits
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(float(np.mean(ref.label_index == gold)))
    figures = results["config"]["adainfer"]["tasks"]["tiny_mc"]
    assert figures["contexts"] == len(contexts) and figures["requests"] == 3 * len(contexts)
    assert figures["mean_exit_layer"] == pytest.approx(ref.exit_layers.mean())
    assert figures["layers_saved"] == pytest.approx(ref.layers_saved)
    assert results["config"]["adainfer"]["correct_full_depth"] is True

    add_to_results(results)
    assert results["adainfer"]["all"]["contexts"] == len(contexts)
    row = results["results"]["tiny_mc"]
    assert row["adainfer_layers_saved,none"] == pytest.approx(ref.layers_saved)
    assert row["adainfer_full_depth_requests,none"] == 0
    table = make_table(results)
    for name in ("acc", "adainfer_mean_exit_layer", "adainfer_layers_saved", "adainfer_wallclock_s"):
        assert f"|{name}" in table.replace(" ", ""), table


def test_the_adainfer_lm_eval_command_prints_the_figures_in_lm_evals_table(tmp_path, capsys, monkeypatch):
    """``adainfer-lm-eval`` is lm-eval's CLI with the model registered; the model loads from a path.
    (lm-eval's index of its own hundreds of tasks, ~15 s here, is left out: the task is local.)"""
    from functools import partialmethod

    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    _classifier(model).save(tmp_path / "clf.json")
    write_task(tmp_path / "tasks")
    args = f"pretrained={tmp_path / 'model'},classifier={tmp_path / 'clf.json'},wallclock_baseline=True"
    argv = [
        "--model",
        "adainfer",
        "--model_args",
        args,
        "--tasks",
        "tiny_mc",
        "--include_path",
        str(tmp_path / "tasks"),
    ]
    assert main([*argv, "--batch_size", "4", "--output_path", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for name in ("acc", "adainfer_mean_exit_layer", "adainfer_layers_saved", "adainfer_speedup"):
        assert f"|{name}" in out.replace(" ", ""), out
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["adainfer"]["tasks"]["tiny_mc"]["contexts"] == 10
    assert saved["adainfer"]["batch_size"] == 4 and saved["adainfer"]["classifier"].endswith("clf.json")
    import lm_eval

    assert "simple_evaluate" not in vars(lm_eval), "the command restores lm-eval's simple_evaluate"


# --------------------------------------------------------------------------------------------
# The bundled real model: lm-eval through the adainfer model == the runtime, on the same prompts


@pytest.mark.slow
def test_bundled_model_lm_eval_accuracy_and_savings_equal_the_runtimes(bundled, tmp_path, capsys):
    """Calibrate from an lm-eval task (``adainfer calibrate --task lmeval:...``), then score its test
    docs through lm-eval with the adainfer model: accuracy and layers saved equal ``adainfer.classify``'s
    (``adainfer eval``'s runtime figures, correct_full_depth=True) on the same prompts."""
    from adainfer.app.cli import main as adainfer_main
    from adainfer.app.datasets import tweet_sentiment
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    source = tweet_sentiment(k_shot=1, sizes={"calibration": 26, "heldout": 0, "test": 12}).render(bundled.tokenizer)
    for split, docs in (("train", "calibration"), ("test", "test")):
        pairs = zip(source.prompts(docs), source.labels(docs), strict=True)
        lines = [json.dumps({"prompt": p, "label": int(y)}) for p, y in pairs]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tweets.yaml").write_text(
        "task: tweets\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {tmp_path / 'train.jsonl'}\n    test: {tmp_path / 'test.jsonl'}\n"
        "training_split: train\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: prompt\ndoc_to_choice: ["negative", "positive"]\ndoc_to_target: label\n'
    )
    clf_path = tmp_path / "clf" / "classifier.json"
    sizes = ["--n-calibration", "12", "--n-heldout", "12", "--n-test", "2", "--batch-size", "12", "--confidence", "0"]
    task = ["--task", "lmeval:tweets", "--include-path", str(tmp_path)]
    rc = adainfer_main(["calibrate", *task, "--out-dir", str(clf_path.parent), "--budget", "0.1", *sizes])
    assert rc == 0, capsys.readouterr().err
    clf = StopClassifier.load(clf_path)
    assert clf.label_words == (" negative", " positive") and clf.threshold is not None
    assert clf.info["task"]["include_path"] == str(tmp_path.resolve())

    lm = AdaInferLM(pretrained="bundled", classifier=str(clf_path), correct_full_depth=True, batch_size=8)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=["tweets"], task_manager=manager, bootstrap_iters=0)
    prompts, gold = source.prompts("test"), source.labels("test")
    ref = adainfer.classify(bundled.model, bundled.tokenizer, prompts, clf, batch_size=8, correct_full_depth=True)
    figures = results["config"]["adainfer"]["tasks"]["tweets"]
    assert (ref.exit_layers < clf.n_layers).any(), "some prompts exit early"
    assert results["results"]["tweets"]["acc,none"] == pytest.approx(float(np.mean(ref.label_index == gold)))
    assert figures["layers_saved"] == pytest.approx(ref.layers_saved)
    assert figures["contexts"] == len(prompts) and figures["full_depth_requests"] == {}
