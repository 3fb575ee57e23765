"""Shared by the lm-eval tests: a word-level tokenizer for the tiny models (offline), random
contexts, and a local lm-eval task (YAML + JSONL)."""

from __future__ import annotations

import json

import torch
from tiny_models import VOCAB

LABELS = {5: "neg", 17: "pos", 40: "neu"}  # token id -> word
CHOICES = ["neg", "pos", "neu"]


def word_tokenizer():
    """A word-level tokenizer over the tiny model's 320 ids (no download): "w<i>" is id i."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({LABELS.get(i, f"w{i}"): i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def random_contexts(n: int = 10, seed: int = 3) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(50, VOCAB, (3 + d % 5,), generator=g)) + " w7" for d in range(n)
    ]


def write_task(folder, name="tiny_mc", n_train=24, n_test=10, doc_to_text="{{text}}", output_type="multiple_choice"):
    """A local lm-eval task (YAML + JSONL, absolute paths: lm-eval reads data_files from the cwd)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for split, n, seed in (("train", n_train, 11), ("test", n_test, 3)):
        for d, text in enumerate(random_contexts(n, seed)):
            rows[split].append({"text": text, "label": d % 3})
        (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {folder / f'{name}_train.jsonl'}\n"
        f"    test: {folder / f'{name}_test.jsonl'}\n"
        "training_split: train\n"
        "test_split: test\n"
        f"output_type: {output_type}\n"
        f'doc_to_text: "{doc_to_text}"\n'
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return rows
