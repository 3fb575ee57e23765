"""lm-eval through the ``adainfer`` model vs ``adainfer eval``'s runtime figures, on the same prompts.

    python bench/lmeval_parity.py --classifier clf.json --out DIR [--batch-size 32] [--n-test N]

1. Rebuilds the test prompts of the task the classifier was calibrated on, exactly as ``adainfer eval``
   does (its stored task settings), and writes them as a local lm-eval task ``DIR/task`` (JSONL +
   YAML: ``doc_to_text: prompt``, the label names as choices, the gold label as target).
2. Runs ``adainfer eval --task <task> --classifier clf.json --wallclock-prompts 0``: its
   ``runtime_accuracy`` / ``runtime_pruning_ratio`` are the patched model's own answers on every test
   prompt (``adainfer.classify``, full-depth answers label-bias corrected).
3. Runs ``adainfer-lm-eval --model adainfer --model_args pretrained=...,classifier=...,
   correct_full_depth=True,wallclock_baseline=True --tasks <name> --include_path DIR/task``.
4. Prints both side by side and writes ``DIR/parity.md``, headed by the record's environment
   (machine, torch / transformers versions, git sha, time: ``harness.environment``).

Both commands run as subprocesses, as a user would run them; their output is kept in ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment

TASK_NAME = "adainfer_parity"


def _write_task(folder: Path, prompts: list[str], labels: list[int], choices: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test.jsonl"
    rows = [json.dumps({"prompt": p, "label": int(y)}) for p, y in zip(prompts, labels, strict=True)]
    data.write_text("\n".join(rows) + "\n")
    (folder / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: prompt\n"  # a field name: the prompt as it is, no template
        f"doc_to_choice: {json.dumps(choices)}\n"
        "doc_to_target: label\n"
        "target_delimiter: ''\n"  # the choices carry their own leading space
    )


def _run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="bundled")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-test", type=int, help="test prompts (default: as calibrated)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from adainfer.app import cli, workflow
    from adainfer.app.loading import load_model
    from adainfer.calibration.classifier import StopClassifier

    clf = StopClassifier.load(args.classifier)
    stored = dict(clf.info.get("task") or {})
    task_spec = stored["task"]
    sizes = dict(stored.get("sizes"))
    if args.n_test:
        sizes["test"] = args.n_test
    eval_argv = ["eval", "--model", args.model, "--task", task_spec, "--classifier", args.classifier]
    ns = cli.build_parser().parse_args(eval_argv)
    task, _ = workflow.load_task_from_args(ns, sizes, stored)  # what `adainfer eval` evaluates
    rendered = task.render(load_model(args.model).tokenizer)
    prompts, labels = rendered.prompts("test"), rendered.labels("test").tolist()
    _write_task(out / "task", prompts, labels, list(rendered.label_forms))

    common = ["--batch-size", str(args.batch_size)]
    n_test = ["--n-test", str(args.n_test)] if args.n_test else []
    eval_cmd = ["adainfer", *eval_argv, *common, *n_test, "--wallclock-prompts", "0", "--no-plots"]
    eval_cmd += ["--out-dir", str(out / "eval")]
    eval_s = _run([sys.executable, "-m", "adainfer.app.cli", *eval_cmd[1:]], out / "eval.log")
    model_args = f"pretrained={args.model},classifier={args.classifier},correct_full_depth=True,wallclock_baseline=True"
    lm_cmd = ["adainfer-lm-eval", "--model", "adainfer", "--model_args", model_args, "--tasks", TASK_NAME]
    lm_cmd += ["--include_path", str(out / "task"), "--batch_size", str(args.batch_size), "--device", "cpu"]
    lm_cmd += ["--output_path", str(out / "lmeval")]
    lm_s = _run([sys.executable, "-m", "adainfer.app.lmeval_model", *lm_cmd[1:]], out / "lmeval.log")

    m = json.loads((out / "eval" / "results.json").read_text())["rows"][0]["metrics"]
    res = json.loads(max((out / "lmeval").rglob("results_*.json"), key=lambda f: f.stat().st_mtime).read_text())
    fig = res["adainfer"]["tasks"][TASK_NAME]
    n_layers = clf.n_layers
    runtime_exit = (1 - m["runtime_pruning_ratio"]) * n_layers
    acc = res["results"][TASK_NAME]["acc,none"]
    env = environment()
    rows = [
        ("prompts", f"{m['runtime_prompts']}", f"{fig['contexts']} ({fig['requests']} requests)"),
        ("accuracy", f"{m['runtime_accuracy']:.4f}", f"{acc:.4f}"),
        ("mean exit layer (of 30)", f"{runtime_exit:.3f}", f"{fig['mean_exit_layer']:.3f}"),
        ("layers saved", f"{m['runtime_pruning_ratio']:.4f}", f"{fig['layers_saved']:.4f}"),
        ("exited early", "", f"{fig['exited_early']:.3f}"),
        (
            "forward wall clock, exits on / off",
            "",
            f"{fig['wallclock_s']:.1f} s / {fig['baseline_wallclock_s']:.1f} s ({fig['speedup']:.2f}x)",
        ),
        ("full-depth requests", "", f"{sum(fig['full_depth_requests'].values())}"),
        ("command wall clock", f"{eval_s:.0f} s", f"{lm_s:.0f} s"),
    ]
    lines = [
        f"# lm-eval (model `adainfer`) vs `adainfer eval` on the same {len(prompts)} prompts",
        "",
        f"classifier: `{args.classifier}` ({clf.method}, {clf.readout}, {clf.label_bias_estimator} bias, from layer "
        f"{clf.min_layer}); task `{task_spec}` test split; batch {args.batch_size}; "
        f"{env['device']}, {res.get('config', {}).get('model_num_parameters', '?')} parameters, "
        f"torch {env['torch']}, transformers {env['transformers']}, lm-eval {res.get('lm_eval_version', '?')}, "
        f"git {env['git']}, {env['time']}",
        "",
        "| | `adainfer eval` (runtime_*) | `adainfer-lm-eval --model adainfer` |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"accuracy difference: {abs(acc - m['runtime_accuracy']) * 100:.2f} points; layers saved difference: "
        f"{abs(fig['layers_saved'] - m['runtime_pruning_ratio']):.4f}",
        "",
        "```",
        " ".join(eval_cmd),
        " ".join(lm_cmd),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    (out / "parity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
