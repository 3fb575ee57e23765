"""The ``adainfer`` command line: ``info``, ``demo`` (the main job), ``calibrate``, ``eval``.

adainfer demo [--quick] [--out-dir DIR]
adainfer calibrate --model bundled|PATH --task tweet-sentiment|FILE|lmeval:NAME --out-dir DIR [options]
adainfer eval --model bundled|PATH --task tweet-sentiment|FILE --classifier DIR|clf.json [options]

This module parses and dispatches: the argument types are in :mod:`adainfer.app.cli_args`, the
demo in :mod:`adainfer.app.pipeline`, calibrate and eval in :mod:`adainfer.app.workflow`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from adainfer.app.cli_args import (
    AGREEMENT,
    BUDGET,
    CONFIDENCE,
    NON_NEGATIVE,
    POSITIVE,
    SPLIT_SIZE,
    add_deprecated_alias,
    classifier_path,
    encoding,
    label_word,
    model_spec,
    nonblank,
    output_dir,
    output_file,
    task_spec,
)
from adainfer.app.splits import MAX_REST, REST
from adainfer.calibration.choices import (
    DTYPE_CHOICES,
    LABEL_BIAS_CHOICES,
    METHOD_CHOICES,
    READOUT_CHOICES,
    TARGETS,
    VOCAB_MODES,
)

# Never download at run time: everything the CLI loads is installed locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Calibration and held-out as `adainfer calibrate` sizes them from 2,100 examples (half each of what
# the test split leaves): the probes gain from calibration rows (research/stop_rule.md: 29% of the
# layers saved at 300, 41% at 900), the 90% bound from held-out rows (at 900 it passes up to 4
# disagreements, 0.44%, against a 1% budget).
DEMO_SIZES = {"calibration": 900, "heldout": 900, "test": 300}
CONFIDENCE_HELP = (
    "certify the budget at this confidence (Clopper-Pearson, fixed-sequence thresholds; default 0.9); "
    "0: the point estimate on the held-out split, which does not hold on new data"
)
LABEL_BIAS_HELP = "per-layer label-bias estimator (auto: balanced for 2 labels, else mean)"
QUICK_SIZES = {"calibration": 16, "heldout": 16, "test": 16}


def _families() -> list[dict]:
    from adainfer.models import FAMILIES, supported_model_types

    return [
        {"model_type": t, "class": FAMILIES[t].causal_lm, "attention": list(FAMILIES[t].attention)}
        for t in supported_model_types()
    ]


def _print_info(as_json: bool) -> int:
    import adainfer_kernels

    info = adainfer_kernels.info()
    info["model_families"] = _families()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    native = info["native_ext"]
    console.print(
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
        f"CUDA available: {info['cuda_available']}" + (f" [{info['gpu']}]" if info["gpu"] else "")
    )
    console.print(
        f"triton {info['triton'] or 'not installed'}" + (" (TRITON_INTERPRET=1)" if info["triton_interpret"] else "")
    )
    if native:
        console.print(
            f"adainfer_kernels._C: loaded (built for torch {native['torch_version']}, "
            f"CUDA kernels: {native['with_cuda']}, {native['compiler']})"
        )
    else:
        console.print(f"adainfer_kernels._C: unavailable ({info['native_ext_error']})")
    console.print(f"CPU threads: {info['cpu_threads']}; forced backend: {info['forced_backend'] or 'none'}")
    from rich.markup import escape

    # One row per op; the CPU exit head also one per weight dtype ("exit_head[bf16]": the kernel
    # that dtype runs here and why). Escaped: rich would read "[bf16]" as markup.
    table = Table(title="backend of each op")
    for col in ("device", "op", "backend", "why"):
        table.add_column(col)
    for dev, ops in info["ops"].items():
        for op, choice in ops.items():
            table.add_row(dev, escape(op), choice["name"], escape(choice["reason"]))
    console.print(table)
    families = Table(title="supported model families (adainfer.models)")
    for col in ("model_type", "class", "attention"):
        families.add_column(col)
    for fam in info["model_families"]:
        families.add_row(fam["model_type"], fam["class"], ", ".join(fam["attention"]))
    console.print(families)
    return 0


def _console():
    from rich.console import Console

    console = Console()
    return Console(width=max(console.width, 220)) if not console.is_terminal else console


# --------------------------------------------------------------------------------------------
# Commands


def _demo(args: argparse.Namespace) -> int:
    from adainfer.app.loading import dtype_name, load_bundled, resolve_dtype
    from adainfer.app.pipeline import RunSettings, model_line, run_demo, runtime_answers
    from adainfer.app.workflow import wallclock_measure

    t0 = time.perf_counter()
    console = _console()
    settings = RunSettings(
        k_shot=2 if args.quick else args.k_shot,
        template=args.template,
        sizes=dict(QUICK_SIZES if args.quick else DEMO_SIZES),
        budget=args.budget,
        confidence=args.confidence,
        label_bias_estimator=args.label_bias,
        batch_size=args.batch_size,
        min_confidence=args.min_agreement,
    )
    if args.n_test:
        settings.sizes["test"] = args.n_test
    dtype = resolve_dtype(args.dtype)
    console.print(f"loading the bundled model (SmolLM2-135M-Instruct, offline, {dtype_name(dtype)}) ...")
    loaded = load_bundled(dtype)
    console.print(model_line(loaded))
    if args.verbose:
        print(loaded.model)
    run_demo(
        loaded,
        settings,
        Path(args.out_dir),
        console=console,
        plots=not args.no_plots,
        measure_wallclock=wallclock_measure(args.wallclock_prompts),
        measure_runtime=runtime_answers,
        extra={"model": model_line(loaded)},
    )
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from adainfer.app.workflow import calibrate_command

    return calibrate_command(args, _console())


def _eval(args: argparse.Namespace) -> int:
    from adainfer.app.workflow import eval_command

    return eval_command(args, _console())


# --------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """Every usage error is one line on stderr, ``adainfer <cmd>: error: <problem and fix>``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option_problem(args: argparse.Namespace) -> str | None:
    """What the parser cannot check alone: options that apply to one kind of task only are refused
    for the other (they were ignored), a required output, options that exclude each other."""
    from adainfer.app.datasets import BUNDLED_TASKS, TWEET3_TASK, TWEET_TASK

    if args.command == "calibrate":
        if args.out_dir is None and args.out_file is None:
            return "the following arguments are required: --out-dir"
        if args.readout == "probe" and args.vocab == "full":
            return "--readout probe answers over the label tokens: it needs --vocab labels"
    bundled = args.task in BUNDLED_TASKS
    for option in ("text_column", "label_column", "encoding"):
        if bundled and getattr(args, option) is not None:
            return f"--{option.replace('_', '-')} applies to task files only, not to {args.task}"
    if args.min_agreement is not None and args.task not in (TWEET_TASK, TWEET3_TASK):
        what = args.task if bundled else f"a task file ({args.task})"
        return f"--min-agreement applies to the tweet tasks only ({TWEET_TASK}, {TWEET3_TASK}), not to {what}"
    return None


def _add_task_args(p: argparse.ArgumentParser) -> None:
    from adainfer.app.templates import TEMPLATES

    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        required=True,
        type=task_spec,
        help="a bundled task (tweet-sentiment, movie-reviews), a .csv/.tsv/.jsonl/.json file, or lmeval:NAME",
    )
    g.add_argument("--text-column", type=nonblank("--text-column"), help="text column of a task file (default: text)")
    g.add_argument(
        "--label-column", type=nonblank("--label-column"), help="label column of a task file (default: label)"
    )
    g.add_argument(
        "--label-words",
        nargs="+",
        type=label_word,
        help="answer words, one per label in sorted label order, or label=word pairs (default: the labels)",
    )
    g.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: plain; user for files)")
    g.add_argument("--k-shot", type=NON_NEGATIVE, help="demonstrations per prompt, >= 0 (default 4)")
    g.add_argument("--seed", type=NON_NEGATIVE, help="seed of the splits and demonstrations, >= 0 (default 0)")
    g.add_argument("--encoding", type=encoding, help="encoding of a CSV/TSV task file (e.g. latin-1)")
    agreement = g.add_argument(
        "--min-agreement", type=AGREEMENT, help="tweet-sentiment: keep rows with annotator agreement >= this"
    )
    add_deprecated_alias(g, "--min-confidence", agreement)
    g.add_argument("--include-path", help="lmeval:NAME tasks: folder of the lm-eval task YAML files")
    p.add_argument(
        "--model", default="bundled", type=model_spec, help="'bundled' or a Hugging Face model directory or .gguf file"
    )
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="prompts per forward pass (default 32)")


def _add_label_bias_arg(p: argparse.ArgumentParser) -> None:
    label_bias = p.add_argument("--label-bias", default="auto", choices=LABEL_BIAS_CHOICES, help=LABEL_BIAS_HELP)
    add_deprecated_alias(p, "--bias", label_bias)


def build_parser() -> argparse.ArgumentParser:
    from adainfer.app.templates import TEMPLATES

    parser = _Parser(prog="adainfer", description="AdaInfer early exit for Hugging Face decoder models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, the native extension and which backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p_demo = sub.add_parser("demo", help="the main job: calibrate and evaluate on the bundled model and data")
    p_demo.add_argument(
        "--quick", action="store_true", help="tiny splits (16 each) and 2 shots: a smoke test, not a measurement"
    )
    out_dir = p_demo.add_argument(
        "--out-dir",
        default="adainfer-results",
        type=output_dir,
        metavar="DIR",
        help="output folder (results.json, classifier.json, PNGs)",
    )
    add_deprecated_alias(p_demo, "--out", out_dir)
    p_demo.add_argument(
        "--budget", type=BUDGET, default=0.01, help="disagreement budget with the full model, in [0, 1)"
    )
    p_demo.add_argument("--confidence", type=CONFIDENCE, default=0.9, help=CONFIDENCE_HELP)
    _add_label_bias_arg(p_demo)
    agreement = p_demo.add_argument(
        "--min-agreement", type=AGREEMENT, default=1.0, help="keep tweets with this annotator agreement, in [0, 1]"
    )
    add_deprecated_alias(p_demo, "--min-confidence", agreement)
    p_demo.add_argument(
        "--template",
        default="plain",
        choices=sorted(TEMPLATES),
        help="prompt template (see research/prompt_search.md)",
    )
    p_demo.add_argument("--k-shot", type=NON_NEGATIVE, default=4, help="demonstrations per prompt, >= 0")
    p_demo.add_argument("--n-test", type=SPLIT_SIZE, help="test examples (default 300)")
    p_demo.add_argument("--batch-size", type=POSITIVE, default=32, help="prompts per forward pass (default 32)")
    p_demo.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_CHOICES,
        help="the model's dtype (default float32; auto: bfloat16 where this CPU multiplies bf16 natively, about "
        "2x faster here, but the runtime's bf16 numerics then differ from the feature pass's: see the README)",
    )
    p_demo.add_argument(
        "--wallclock-prompts",
        type=NON_NEGATIVE,
        default=96,
        help="time the runtime (full vs AdaInfer) on this many test prompts (0: skip; default 96)",
    )
    p_demo.add_argument("--no-plots", action="store_true")
    p_demo.add_argument("-v", "--verbose", action="store_true", help="print the whole module tree")

    p_cal = sub.add_parser("calibrate", help="fit a stop classifier for a model and task, save it as JSON")
    _add_task_args(p_cal)
    out = p_cal.add_mutually_exclusive_group()
    out.add_argument(
        "--out-dir",
        type=output_dir,
        metavar="DIR",
        help="output folder: writes classifier.json (and a probe's weights beside it); required",
    )
    add_deprecated_alias(
        out,
        "--out",
        use="--out-dir DIR (it writes DIR/classifier.json)",
        dest="out_file",
        type=output_file,
        default=None,
    )
    p_cal.add_argument("--budget", type=BUDGET, default=0.01, help="disagreement budget with the full model, in [0, 1)")
    p_cal.add_argument("--confidence", type=CONFIDENCE, default=0.9, help=CONFIDENCE_HELP)
    p_cal.add_argument("--target", default="consistency", choices=TARGETS)
    p_cal.add_argument("--method", default="auto", choices=METHOD_CHOICES)
    _add_label_bias_arg(p_cal)
    p_cal.add_argument("--vocab", default="labels", choices=VOCAB_MODES, help="exit head over labels or all")
    p_cal.add_argument("--no-layer-feature", action="store_true", help="features top_prob and gap only")
    readout = p_cal.add_argument(
        "--readout",
        default="auto",
        choices=READOUT_CHOICES,
        help="decode layer k through the model's LM head (lens) or a per-layer probe of the hidden state; "
        "auto: both, keep the one that saves more layers on the calibration split",
    )
    add_deprecated_alias(p_cal, "--exit-head", readout)
    p_cal.add_argument(
        "--n-calibration",
        type=SPLIT_SIZE,
        default=REST,
        help="fits the probes and the stop rule (default: half of the examples --n-test leaves, up to "
        f"{MAX_REST:,}; the other half certifies)",
    )
    p_cal.add_argument(
        "--n-heldout",
        type=SPLIT_SIZE,
        default=REST,
        help=f"certify the threshold (default: half of the examples --n-test leaves, up to {MAX_REST:,})",
    )
    p_cal.add_argument("--n-test", type=SPLIT_SIZE, default=300, help="reserved for eval (kept disjoint)")
    p_cal.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_CHOICES,
        help="the model's dtype while calibrating (default float32; auto: bfloat16 where this CPU multiplies "
        "bf16 natively); stored with the classifier, eval runs in it",
    )

    p_eval = sub.add_parser("eval", help="evaluate a saved classifier on a task's test split")
    _add_task_args(p_eval)
    p_eval.add_argument(
        "--classifier",
        required=True,
        type=classifier_path,
        help="classifier JSON from `adainfer calibrate`, or the folder holding its classifier.json",
    )
    p_eval.add_argument("--n-test", type=SPLIT_SIZE, help="test examples (default: as calibrated)")
    p_eval.add_argument(
        "--wallclock-prompts",
        type=NON_NEGATIVE,
        help="time the runtime on this many test prompts (0: skip; default: all)",
    )
    p_eval.add_argument(
        "--out-dir",
        default="adainfer-results",
        type=output_dir,
        metavar="DIR",
        help="output folder (results.json, PNGs)",
    )
    p_eval.add_argument("--no-plots", action="store_true")
    p_eval.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="the model's dtype (default: the one the classifier was calibrated in)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for every user error, with one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: a usage error (2, reported) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    problem = _option_problem(args) if args.command in ("calibrate", "eval") else None
    if problem:
        print(f"adainfer {args.command}: error: {problem}", file=sys.stderr)
        return 2
    if args.command == "info":
        return _print_info(args.json)
    from adainfer.calibration.classifier import ClassifierFileError

    handlers = {"demo": _demo, "calibrate": _calibrate, "eval": _eval}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError, ClassifierFileError, KeyError) as exc:
        print(f"adainfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
