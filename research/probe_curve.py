"""How many calibration examples the probe readouts need, and whether the budget holds out of
sample, on the bundled model and a real task.

One pass of the unpatched model collects per-layer features (label logits and last-token hidden
states) of a pool of examples, cached on disk. Then, in numpy only:

1. Probe curve: for n calibration examples (several random draws each), calibrate the lens and the
   probe readouts (svm + label bias, 1% budget, threshold on a fixed held-out split) and measure
   on a fixed test split: layers saved, disagreement with the full model, accuracy, fit time.
2. Re-draws: 20 random re-draws of (calibration, held-out, test) from the pool; for each, the
   test disagreement of the calibrated rule with and without a 0.9-confidence (Clopper-Pearson)
   budget: in how many draws does it stay within the budget?

    .venv/bin/python research/probe_curve.py --task tweet-sentiment --out research/probe_curve.md
    .venv/bin/python research/probe_curve.py --task movie-reviews --out research/probe_curve_movies.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from adainfer.app.loading import cache_dir, load_bundled
from adainfer.app.tasks import load_task
from adainfer.calibration.evaluate import evaluate
from adainfer.calibration.features import LayerFeatures, collect_content_free, collect_task_features
from adainfer.calibration.fit import calibrate

POOL = {"calibration": 400, "heldout": 400, "test": 300}


def _concat(parts: list[LayerFeatures]) -> LayerFeatures:
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    first = parts[0]
    return LayerFeatures(
        label_logits=cat("label_logits"),
        labels=cat("labels"),
        label_token_ids=first.label_token_ids,
        prompt_lengths=cat("prompt_lengths"),
        hidden=cat("hidden"),
        meta=first.meta,
    )


def collect(task_name: str, batch_size: int) -> dict[str, LayerFeatures]:
    folder = cache_dir() / "research" / f"probe_curve-{task_name}"
    names = [*POOL, "content-free"]
    if all((folder / f"{s}.npz").exists() for s in names):
        return {s: LayerFeatures.load(folder / f"{s}.npz") for s in names}
    loaded = load_bundled()
    task = load_task(task_name, sizes=dict(POOL))
    rendered = task.render(loaded.tokenizer)
    feats = {
        s: collect_task_features(loaded.model, rendered, s, batch_size=batch_size, full_vocab=False, keep_hidden=True)
        for s in POOL
    }
    feats["content-free"] = collect_content_free(loaded.model, rendered, batch_size=batch_size, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    for s, f in feats.items():
        f.save(folder / f"{s}.npz")
    return feats


def _run(cal, held, test, cf, readout: str, budget: float, confidence: float | None) -> dict:
    t0 = time.perf_counter()
    clf = calibrate(cal, held, method="svm", budget=budget, confidence=confidence, content_free=cf, readout=readout)
    fit_s = time.perf_counter() - t0
    m = evaluate(test, clf)
    return {**m, "fit_s": fit_s, "min_layer": clf.min_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tweet-sentiment")
    ap.add_argument("--out", default="research/probe_curve.md")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--redraws-only", action="store_true", help="skip the calibration curve")
    args = ap.parse_args()
    t0 = time.perf_counter()
    feats = collect(args.task, args.batch_size)
    t_feats = time.perf_counter() - t0
    cal_pool, held, test, cf = feats["calibration"], feats["heldout"], feats["test"], feats["content-free"]
    lines = [
        f"# Probe exit heads: calibration curve and re-draws ({args.task}, bundled SmolLM2-135M)",
        "",
        f"Command: `.venv/bin/python research/probe_curve.py --task {args.task} --out {args.out}`. "
        f"Pool: {', '.join(f'{k} {v}' for k, v in POOL.items())} (features {t_feats:.0f} s, cached). "
        f"svm stop classifier + label bias, budget {args.budget:.0%}, threshold on the held-out split, "
        "figures on the test split.",
        "",
        "## Calibration examples vs layers saved (3 random draws of the calibration examples each)",
        "",
        "| n calibration | exit head | layers saved (mean, min-max) | test disagreement (mean, max) "
        "| accuracy | fit s |",
        "|---|---|---|---|---|---|",
    ]
    for n in () if args.redraws_only else (25, 50, 100, 200, 400):
        for head in ("lens", "probe"):
            runs = []
            for seed in range(3 if n < 400 else 1):
                idx = np.random.default_rng(seed).permutation(cal_pool.n_examples)[:n]
                runs.append(_run(cal_pool.subset(idx), held, test, cf, head, args.budget, None))
            pr = [r["pruning_ratio"] for r in runs]
            dis = [1 - r["agreement"] for r in runs]
            lines.append(
                f"| {n} | {head} | {np.mean(pr):.3f} ({min(pr):.3f}-{max(pr):.3f}) | {np.mean(dis):.3f} "
                f"({max(dis):.3f}) | {np.mean([r['adainfer_accuracy'] for r in runs]):.3f} "
                f"(full {runs[0]['full_accuracy']:.3f}) | {np.mean([r['fit_s'] for r in runs]):.1f} |"
            )
            print(lines[-1], flush=True)
    pool = _concat([cal_pool, held, test])
    lines += [
        "",
        f"## Re-draws of the splits ({args.draws} draws of calibration 200 / held-out 400 / test 300 from the pool)",
        "",
        "| exit head | confidence | draws within budget | test disagreement (median, max) | layers saved (median) |",
        "|---|---|---|---|---|",
    ]
    results = {(h, c): ([], []) for h in ("lens", "probe") for c in (None, 0.9)}
    for draw in range(args.draws):
        order = np.random.default_rng(1000 + draw).permutation(pool.n_examples)
        c_rows, h_rows, t_rows = pool.subset(order[:200]), pool.subset(order[200:600]), pool.subset(order[600:900])
        for (head, confidence), (dis, pr) in results.items():
            r = _run(c_rows, h_rows, t_rows, cf, head, args.budget, confidence)
            dis.append(1 - r["agreement"])
            pr.append(r["pruning_ratio"])
        print(f"draw {draw}", flush=True)
    for (head, confidence), (dis, pr) in results.items():
        within = int(np.sum(np.array(dis) <= args.budget + 1e-12))
        lines.append(
            f"| {head} | {confidence or 'none'} | {within}/{args.draws} | {np.median(dis):.3f}, {max(dis):.3f} | "
            f"{np.median(pr):.3f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s on this 2-core machine (shared)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
