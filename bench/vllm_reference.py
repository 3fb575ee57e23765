"""The Hugging Face runtime's answers on a classifier's test prompts: the reference vLLM is held to.

Runs in the main venv (it needs the task loaders): rebuilds the task the classifier was calibrated
on from its stored settings, takes the first ``--n`` test examples, and writes a JSON file with the
prompts, the bundled model's safetensors folder, and per prompt the HF runtime's exit layer, answer
token, label log-probabilities (``adainfer.classify``) and the full model's answer (exits off).

    .venv/bin/python bench/vllm_reference.py --classifier clf/classifier.json --n 64 --out ref.json
"""

from __future__ import annotations

import argparse
import json
from argparse import Namespace
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", required=True)
    p.add_argument("--n", type=int, default=64, help="test prompts (the first n of the test split)")
    p.add_argument("--split", default="test", choices=("calibration", "heldout", "test"))
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from adainfer.app.classify import classify
    from adainfer.app.loading import _cache_key, bundled_model_dir, cache_dir, load_bundled
    from adainfer.app.workflow import load_task_from_args
    from adainfer.calibration.classifier import StopClassifier

    clf = StopClassifier.load(args.classifier)
    stored = dict(clf.info.get("task") or {})
    ns = Namespace(
        task=stored["task"], k_shot=None, template=None, label_words=None, seed=None,
        min_agreement=None, text_column=None, label_column=None, encoding=None,
    )  # fmt: skip
    task, _ = load_task_from_args(ns, dict(stored["sizes"]), stored)
    loaded = load_bundled(torch.float32)
    folder = cache_dir() / _cache_key(bundled_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf")
    rendered = task.render(loaded.tokenizer)
    examples = list(task.splits[args.split])
    examples = examples[: args.n]
    prompts = [rendered.prompt(e.text) for e in examples]
    out = classify(loaded.model, loaded.tokenizer, prompts, clf, batch_size=args.batch_size, progress=False)
    with torch.inference_mode():
        full = []
        for i in range(0, len(prompts), args.batch_size):
            batch = loaded.tokenizer(prompts[i : i + args.batch_size], return_tensors="pt", padding=True)
            logits = loaded.model(**batch).logits[:, -1, :]
            full += logits.argmax(-1).tolist()
    label_ids = [int(t) for t in clf.label_token_ids]
    ref = {
        "classifier": str(Path(args.classifier).resolve()),
        "model_dir": str(folder),
        "num_layers": clf.n_layers,
        "label_token_ids": label_ids,
        "prompts": prompts,
        "gold": [label_ids[e.label] for e in examples],
        "hf_exit_layers": out.exit_layers.tolist(),
        "hf_answer_token": out.answer_token.tolist(),
        "hf_label_logprobs": torch.as_tensor(out.probs).log().tolist(),
        "full_answer_token": full,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(ref))
    saved = 1 - sum(ref["hf_exit_layers"]) / (len(prompts) * clf.n_layers)
    print(f"wrote {args.out}: {len(prompts)} prompts, HF runtime saves {saved:.1%} of the layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
