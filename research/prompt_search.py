"""Prompt search for the bundled tweet-sentiment task on the bundled model.

Early exit on a task the model cannot do says nothing, so the prompt comes first: for each
configuration (template, label words, shots, chat vs plain, data filter) this collects the per-layer
label logits of the same balanced examples and reports final-layer accuracy raw and with each
label-bias estimator, the AUC of the final-layer label margin, the margin's AUC at a few layers,
and the oracle pruning ratio. Estimators that look at the evaluated prompts (``mean``,
``balanced``) are cross-fitted over two halves, so no example calibrates its own answer.

    .venv/bin/python research/prompt_search.py --n 200 --out research/prompt_search.md

Results are appended to the markdown table as each configuration finishes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from adainfer.app.datasets import tweet_sentiment
from adainfer.app.loading import load_bundled
from adainfer.calibration.features import collect_content_free, collect_task_features, label_margin, label_signals
from adainfer.calibration.labelbias import estimate_label_bias
from adainfer.calibration.metrics import oracle_exit_layers
from sklearn.metrics import roc_auc_score

CONFIGS = [
    # (id, template, label words, k_shot, min_confidence[, demo_seed])
    ("plain-4", "plain", (" negative", " positive"), 4, 0.0),
    ("instruct-0", "instruct", (" negative", " positive"), 0, 0.0),
    ("instruct-2", "instruct", (" negative", " positive"), 2, 0.0),
    ("instruct-4", "instruct", (" negative", " positive"), 4, 0.0),
    ("instruct-8", "instruct", (" negative", " positive"), 8, 0.0),
    ("qa-4", "qa", (" negative", " positive"), 4, 0.0),
    ("chat-4", "chat", ("negative", "positive"), 4, 0.0),
    ("instruct-4-goodbad", "instruct", (" bad", " good"), 4, 0.0),
    ("instruct-4-happysad", "instruct", (" sad", " happy"), 4, 0.0),
    ("instruct-4-conf1", "instruct", (" negative", " positive"), 4, 1.0),
    ("instruct-8-conf1", "instruct", (" negative", " positive"), 8, 1.0),
    # round 2: the best data filter, plain vs instruct, shots, and other demonstration draws
    ("plain-4-conf1", "plain", (" negative", " positive"), 4, 1.0),
    ("plain-8-conf1", "plain", (" negative", " positive"), 8, 1.0),
    ("plain-4-conf1-demos1", "plain", (" negative", " positive"), 4, 1.0, 1),
    ("plain-4-conf1-demos2", "plain", (" negative", " positive"), 4, 1.0, 2),
    ("instruct-4-conf1-demos1", "instruct", (" negative", " positive"), 4, 1.0, 1),
    ("instruct-4-conf1-demos2", "instruct", (" negative", " positive"), 4, 1.0, 2),
]

HEADER = (
    "| config | template | words | shots | min conf | demo seed | prompt tokens | raw acc | acc content-free | "
    "acc mean (x-fit) | acc balanced (x-fit) | final margin AUC | AUC L15 | AUC L21 | AUC L23 | "
    "oracle ratio (mean) | s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _crossfit_acc(feats, method: str) -> float:
    n = feats.n_examples
    halves = [np.arange(0, n // 2), np.arange(n // 2, n)]
    correct = 0
    for fit, ev in (halves, halves[::-1]):
        bias = estimate_label_bias(method, feats.subset(fit))
        _, _, pred = label_signals(feats.subset(ev), bias)
        correct += int((pred[:, -1] == feats.labels[ev]).sum())
    return correct / n


def _auc(feats, layer: int) -> float:
    return float(roc_auc_score(feats.labels, label_margin(feats)[:, layer - 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="balanced examples per configuration")
    ap.add_argument("--out", default="research/prompt_search.md")
    ap.add_argument("--only", nargs="*", help="config ids to run")
    args = ap.parse_args()
    loaded = load_bundled()
    model, tok = loaded.model, loaded.tokenizer
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(
            "# Prompt search: bundled tweet sentiment on SmolLM2-135M-Instruct\n\n"
            f"Command: `.venv/bin/python research/prompt_search.py --n {args.n}`. Same seed (0) and "
            f"{args.n} balanced examples (the calibration split) per row, fp32, CPU.\n\n" + HEADER
        )
    for cid, template, words, k, conf, *rest in CONFIGS:
        if args.only and cid not in args.only:
            continue
        demo_seed = rest[0] if rest else None
        t0 = time.time()
        task = tweet_sentiment(
            k_shot=k,
            template=template,
            label_words=words,
            sizes={"calibration": args.n, "heldout": 0, "test": 0},
            min_confidence=conf,
            demo_seed=demo_seed,
        )
        rendered = task.render(tok)
        feats = collect_task_features(model, rendered, "calibration", full_vocab=False, desc=cid)
        cf = collect_content_free(model, rendered, progress=False)
        _, _, raw_pred = label_signals(feats)
        cf_bias = estimate_label_bias("content-free", feats, cf)
        _, _, cf_pred = label_signals(feats, cf_bias)
        mean_bias = estimate_label_bias("mean", feats)
        _, _, mean_pred = label_signals(feats, mean_bias)
        oracle = oracle_exit_layers(mean_pred)
        n_layers = feats.n_layers
        tokens = float(np.mean(feats.prompt_lengths))
        row = (
            f"| {cid} | {template} | {'/'.join(w.strip() for w in rendered.label_forms)} | {k} | {conf:g} | "
            f"{0 if demo_seed is None else demo_seed} | "
            f"{tokens:.0f} | {np.mean(raw_pred[:, -1] == feats.labels):.3f} | "
            f"{np.mean(cf_pred[:, -1] == feats.labels):.3f} | {_crossfit_acc(feats, 'mean'):.3f} | "
            f"{_crossfit_acc(feats, 'balanced'):.3f} | {_auc(feats, n_layers):.3f} | {_auc(feats, 15):.3f} | "
            f"{_auc(feats, 21):.3f} | {_auc(feats, 23):.3f} | {1 - oracle.mean() / n_layers:.3f} | "
            f"{time.time() - t0:.0f} |\n"
        )
        print(row, end="", flush=True)
        with out.open("a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
