"""Stop rules on real tasks: the former defaults, the new defaults and the oracle, over re-draws.

For each task, one pass of the unpatched bundled model over a pool of examples (cached on disk,
per dtype) gives the per-layer features. Then, for each draw of disjoint splits from the pool
(test: 300 examples, never used to fit or choose anything):

- ``former``: the defaults before issue 18: calibration 400 / held-out 400, the svm stop rule, the
  lens or probe readout whichever ran fewer layers *on the held-out split* (which also certified it);
- ``new``: the defaults now: calibration and held-out share the remaining examples evenly (up to
  1,200 each), the readout (lens, probe) and the rule (gap, svm) chosen on the calibration split
  (out-of-fold probe signals), the threshold alone certified on held-out;
- ``oracle``: each test row stops at the earliest layer from which the new rule's readout gives
  the full model's answer for good.

Budget 1% at 90% confidence. Figures on test: layers saved, disagreement with the full model,
accuracy minus the full model's. With ``--wallclock N``, draw 0's ``new`` classifier runs through the
runtime on the first N test prompts, full model and exits alternating batch by batch (batch 32).

    .venv/bin/python research/stop_rule.py --tasks tweet-sentiment movie-reviews --draws 20
    .venv/bin/python research/stop_rule.py --tasks cities --draws 5 --wallclock 96 --dtype bfloat16
    .venv/bin/python research/stop_rule.py --tasks lmeval:rt_sst2 --include-path DIR   # lmeval_rt_sst2.py DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from adainfer.app.loading import cache_dir, load_bundled
from adainfer.app.splits import MAX_REST
from adainfer.app.tasks import load_task
from adainfer.calibration.evaluate import evaluate
from adainfer.calibration.features import LayerFeatures, collect_task_features
from adainfer.calibration.fit import calibrate, calibrate_auto

BUDGET, CONFIDENCE, N_TEST = 0.01, 0.9, 300
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pool_path(task: str, dtype: str, n: int) -> Path:
    return cache_dir() / "research" / f"stop_rule-{task}" / f"pool-{dtype}-{n}.npz"


def load_pool(
    task: str, n: int, dtype: str, loaded=None, include_path: str | None = None
) -> tuple[LayerFeatures, list[str]]:
    """The pool's features (cached) and its prompts, in the same order."""
    path = pool_path(task.replace(":", "-"), dtype, n)
    loaded = loaded or load_bundled(dtype=DTYPES[dtype])
    where = {"include_path": include_path} if include_path else {}  # the folder of lmeval:NAME tasks
    rendered = load_task(task, sizes={"calibration": n, "heldout": 0, "test": 0}, **where).render(loaded.tokenizer)
    if path.exists():
        feats = LayerFeatures.load(path)
    else:
        feats = collect_task_features(loaded.model, rendered, "calibration", batch_size=32, keep_hidden=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        feats.save(path)
    prompts = rendered.prompts("calibration")
    if len(prompts) != feats.n_examples:
        raise RuntimeError(f"{path} has {feats.n_examples} rows, the task {len(prompts)} prompts: delete it")
    return feats, prompts


def former_defaults(cal: LayerFeatures, held: LayerFeatures):
    """The procedure before issue 18: svm, the readout chosen by held-out mean exit layer."""
    kwargs = dict(method="svm", budget=BUDGET, confidence=CONFIDENCE)
    cands = [calibrate(cal, held, readout=h, **kwargs) for h in ("lens", "probe")]
    return min(cands, key=lambda c: (c.info["heldout_mean_exit_layer"], c.readout != "lens"))


def new_defaults(cal: LayerFeatures, held: LayerFeatures):
    return calibrate_auto(cal, held, readout="auto", method="auto", budget=BUDGET, confidence=CONFIDENCE)


def draw_splits(n: int, draw: int, n_former: tuple[int, int], n_new: tuple[int, int]):
    order = np.random.default_rng(1000 + draw).permutation(n)
    test, rest = order[:N_TEST], order[N_TEST:]
    former = (rest[: n_former[0]], rest[n_former[0] : n_former[0] + n_former[1]])
    new = (rest[: n_new[0]], rest[n_new[0] : n_new[0] + n_new[1]])
    return test, former, new


def figures(test: LayerFeatures, clf) -> dict:
    m = evaluate(test, clf)
    return {
        "saved": m["pruning_ratio"],
        "disagreement": 1.0 - m["agreement"],
        "accuracy_delta": m["adainfer_accuracy"] - m["full_accuracy"],
        "full_accuracy": m["full_accuracy"],
        "oracle": m["oracle_pruning_ratio"],
        "rule": f"{clf.method} {clf.readout} from {clf.min_layer}" if clf.threshold is not None else "never",
    }


def run_task(task: str, args, loaded) -> dict:
    feats, prompts = load_pool(task, args.pool, args.dtype, loaded, args.include_path)
    n = feats.n_examples
    left = n - N_TEST
    n_former = (min(400, left // 2), min(400, left // 2))
    n_new = (min(MAX_REST, left // 2), min(MAX_REST, left // 2))
    rows = []
    t0 = time.perf_counter()
    for draw in range(args.draws):
        test_idx, (fc, fh), (nc, nh) = draw_splits(n, draw, n_former, n_new)
        test = feats.subset(test_idx)
        row = {"former": figures(test, former_defaults(feats.subset(fc), feats.subset(fh)))}
        clf = new_defaults(feats.subset(nc), feats.subset(nh))
        row["new"] = figures(test, clf)
        if draw == 0 and args.wallclock:
            from adainfer.app.costs import measure_forward_cost
            from adainfer.calibration.preflight import preflight
            from adainfer.runtime.wallclock import RuntimeWallclock

            timed = [prompts[i] for i in test_idx[: args.wallclock]]
            w = RuntimeWallclock(max_prompts=args.wallclock)(loaded.model, loaded.tokenizer, timed, clf, 32)
            cost = measure_forward_cost(loaded.model, loaded.tokenizer, [prompts[i] for i in nh], 32)
            row["wallclock"] = {
                "full_s": w["full_s"],
                "exits_s": w["adainfer_s"],
                "prompts": len(timed),
                "predicted": preflight(clf, cost).speedup,  # the pre-flight's cost model, on held-out
            }
        rows.append(row)
        print(task, draw, json.dumps({k: v for k, v in row.items()}, default=float), flush=True)
    return {
        "task": task,
        "dtype": args.dtype,
        "pool": n,
        "sizes": {"former": n_former, "new": n_new, "test": N_TEST},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def table(result: dict) -> list[str]:
    rows = result["rows"]
    out = [
        f"### {result['task']} ({result['dtype']}, pool {result['pool']}, {len(rows)} draws; "
        f"former {result['sizes']['former'][0]}/{result['sizes']['former'][1]}, "
        f"new {result['sizes']['new'][0]}/{result['sizes']['new'][1]}, test {N_TEST})",
        "",
        "| rule | layers saved (mean, min-max) | test disagreement (mean, max) | within 1% | accuracy vs full "
        "| wall clock |",
        "|---|---|---|---|---|---|",
    ]
    w = rows[0].get("wallclock")
    for name in ("former", "new"):
        saved = np.array([r[name]["saved"] for r in rows])
        dis = np.array([r[name]["disagreement"] for r in rows])
        acc = np.array([r[name]["accuracy_delta"] for r in rows])
        clock = ""
        if w and name == "new":
            measured = w["full_s"] / w["exits_s"]
            clock = f"{measured:.2f}x ({w['prompts']} prompts; pre-flight predicted {w['predicted']:.2f}x)"
        out.append(
            f"| {name} | {saved.mean():.1%} ({saved.min():.1%}-{saved.max():.1%}) | {dis.mean():.2%} ({dis.max():.2%}) "
            f"| {int(np.sum(dis <= BUDGET + 1e-12))}/{len(rows)} | {acc.mean():+.1%} | {clock} |"
        )
    oracle = np.array([r["new"]["oracle"] for r in rows])
    full = np.array([r["new"]["full_accuracy"] for r in rows])
    out.append(f"| oracle | {oracle.mean():.1%} | 0 | | {0:+.1%} (full {full.mean():.1%}) | |")
    rules = sorted({r["new"]["rule"].rsplit(" from ", 1)[0] for r in rows})
    out += ["", f"new rules chosen: {', '.join(rules)}; {result['seconds']:.0f} s", ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["tweet-sentiment"])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--pool", type=int, default=1500, help="examples per task (smaller tasks: their size)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--wallclock", type=int, default=0, help="time the runtime on this many test prompts")
    ap.add_argument("--out", default=None, help="append the tables to this markdown file")
    ap.add_argument("--include-path", default=None, help="the folder of lmeval:NAME tasks (lmeval_rt_sst2.py)")
    args = ap.parse_args()
    loaded = load_bundled(dtype=DTYPES[args.dtype])
    lines = []
    for task in args.tasks:
        lines += table(run_task(task, args, loaded))
        print("\n".join(lines[-8:]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
