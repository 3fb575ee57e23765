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

# Free-text prompts for the full-vocabulary generation check.
LENS_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
)


def lens_reference(loaded, path: Path, max_new_tokens: int) -> dict:
    """A full-vocabulary lens classifier (a plain gap threshold, 0.95, from layer 14) saved at ``path``,
    and the patched model's greedy tokens and per-step exit layers on ``LENS_PROMPTS``: free text
    makes later steps run deeper than earlier ones exited, so they read the K/V state propagation
    filled (the label-task generation above exits at the same layer every step after the first)."""
    from adainfer.calibration.classifier import ModelIdentity, StopClassifier
    from adainfer.runtime.patch import patched

    clf = StopClassifier(
        identity=ModelIdentity.from_model(loaded.model), method="gap", target="consistency", vocab_mode="full",
        w_top_prob=0.0, w_gap=1.0, w_layer=0.0, intercept=0.0, threshold=0.95, min_layer=14,
        info={"note": "bench/vllm_reference.py: a fixed rule for the K/V fill check, not calibrated"},
    )  # fmt: skip
    clf.save(path)
    tokens, exits = [], []
    with torch.inference_mode(), patched(loaded.model, clf) as handle:
        steps: list[int] = []
        hook = loaded.model.register_forward_hook(lambda *_: steps.append(int(handle.last_stats.exit_layers[0])))
        for prompt in LENS_PROMPTS:
            steps.clear()
            batch = loaded.tokenizer([prompt], return_tensors="pt")
            out_ids = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            tokens.append(out_ids[0, batch["input_ids"].shape[1] :].tolist())
            exits.append(list(steps))
        hook.remove()
    return {"classifier": str(path.resolve()), "prompts": list(LENS_PROMPTS), "max_new_tokens": max_new_tokens,
            "hf_generated": tokens, "hf_generated_exits": exits}  # fmt: skip


def label_lens_reference(loaded, clf, prompts: list[str], path: Path) -> dict:
    """A label-token lens rule (gap over the task's label tokens from layer 10, no label bias: fixed,
    not calibrated) saved at ``path``, and the HF runtime's exit layers and answers on ``prompts``:
    the lens readout over label rows (what tensor parallel gathers onto every rank)."""
    from adainfer.app.classify import classify
    from adainfer.calibration.classifier import ModelIdentity, StopClassifier

    lens = StopClassifier(
        identity=ModelIdentity.from_model(loaded.model), method="gap", target="consistency", vocab_mode="labels",
        w_top_prob=0.0, w_gap=1.0, w_layer=0.0, intercept=0.0, threshold=0.6, min_layer=10,
        label_token_ids=tuple(clf.label_token_ids), label_words=clf.label_words,
        info={"note": "bench/vllm_reference.py: a fixed rule for the tensor-parallel check, not calibrated"},
    )  # fmt: skip
    lens.save(path)
    out = classify(loaded.model, loaded.tokenizer, prompts, lens, batch_size=16, progress=False)
    return {
        "classifier": str(path.resolve()),
        "n": len(prompts),
        "hf_exit_layers": out.exit_layers.tolist(),
        "hf_answer_token": out.answer_token.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", required=True)
    p.add_argument("--n", type=int, default=64, help="test prompts (the first n of the test split)")
    p.add_argument("--split", default="test", choices=("calibration", "heldout", "test"))
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-generate", type=int, default=4, help="prompts also generated from, with exits")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--lens-max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)

    from adainfer.app.classify import classify
    from adainfer.app.loading import bundled_hf_dir, load_bundled
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
    folder = bundled_hf_dir()
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
    # Greedy generation through the patched model, one prompt at a time, and the exit layer of each
    # step: later steps read the K/V that state propagation filled for the layers earlier ones skipped.
    generated, generated_exits = [], []
    from adainfer.runtime.patch import patched

    with torch.inference_mode(), patched(loaded.model, clf) as handle:
        steps: list[int] = []
        hook = loaded.model.register_forward_hook(lambda *_: steps.append(int(handle.last_stats.exit_layers[0])))
        for prompt in prompts[: args.n_generate]:
            steps.clear()
            batch = loaded.tokenizer([prompt], return_tensors="pt")
            out_ids = loaded.model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            generated.append(out_ids[0, batch["input_ids"].shape[1] :].tolist())
            generated_exits.append(list(steps))
        hook.remove()
    lens = lens_reference(loaded, Path(args.out).with_name("lens_classifier.json"), args.lens_max_new_tokens)
    label_lens = label_lens_reference(loaded, clf, prompts[:16], Path(args.out).with_name("label_lens_classifier.json"))
    label_ids = [int(t) for t in clf.label_token_ids]
    ref = {
        "classifier": str(Path(args.classifier).resolve()),
        "model_dir": str(folder),
        "num_layers": clf.n_layers,
        "label_token_ids": label_ids,
        "label_forms": list(rendered.label_forms),
        "prompts": prompts,
        "gold": [label_ids[e.label] for e in examples],
        "hf_exit_layers": out.exit_layers.tolist(),
        "hf_answer_token": out.answer_token.tolist(),
        "hf_label_logprobs": torch.as_tensor(out.probs).log().tolist(),
        "full_answer_token": full,
        "max_new_tokens": args.max_new_tokens,
        "hf_generated": generated,
        "hf_generated_exits": generated_exits,
        "lens": lens,
        "label_lens": label_lens,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(ref))
    saved = 1 - sum(ref["hf_exit_layers"]) / (len(prompts) * clf.n_layers)
    print(f"wrote {args.out}: {len(prompts)} prompts, HF runtime saves {saved:.1%} of the layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
