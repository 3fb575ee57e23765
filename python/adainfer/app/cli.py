"""The ``adainfer`` command line: ``info``, ``demo`` (the main job), ``calibrate``, ``eval``.

adainfer demo [--quick] [--out DIR]
adainfer calibrate --model bundled|PATH --task tweet-sentiment|FILE|lmeval:NAME --out clf.json [options]
adainfer eval --model bundled|PATH --task tweet-sentiment|FILE --classifier clf.json [options]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Never download at run time: everything the CLI loads is installed locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_SIZES = {"calibration": 100, "heldout": 400, "test": 300}
BIAS_CHOICES = ["auto", "none", "content-free", "mean", "balanced"]
BIAS_HELP = "per-layer label-bias estimator (auto: balanced for 2 labels, else mean)"
QUICK_SIZES = {"calibration": 16, "heldout": 16, "test": 16}


def wallclock_measure(max_prompts: int | None):
    """The wall-clock measurement of the early-exit runtime (an ``adainfer.evaluate.WallclockFn``)
    over the first ``max_prompts`` test prompts (None: all; 0: not measured)."""
    if max_prompts == 0:
        return None
    from adainfer.runtime.wallclock import RuntimeWallclock

    return RuntimeWallclock(max_prompts=max_prompts)


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
    table = Table(title="backend of each op")
    for col in ("device", "op", "backend", "why"):
        table.add_column(col)
    for dev, ops in info["ops"].items():
        for op, choice in ops.items():
            table.add_row(dev, op, choice["name"], choice["reason"])
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


def _model_line(loaded) -> str:
    model = loaded.model
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{type(model).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters, attention {cfg._attn_implementation}"
    )


# --------------------------------------------------------------------------------------------
# demo


def _demo(args: argparse.Namespace) -> int:
    from adainfer.app.loading import load_bundled
    from adainfer.app.pipeline import RunSettings, run_demo, runtime_answers

    t0 = time.perf_counter()
    console = _console()
    settings = RunSettings(
        k_shot=2 if args.quick else args.k_shot,
        template=args.template,
        sizes=dict(QUICK_SIZES if args.quick else DEMO_SIZES),
        budget=args.budget,
        confidence=args.confidence,
        bias_method=args.bias,
        batch_size=args.batch_size,
        min_confidence=args.min_confidence,
    )
    if args.n_test:
        settings.sizes["test"] = args.n_test
    console.print("loading the bundled model (SmolLM2-135M-Instruct, offline) ...")
    loaded = load_bundled()
    console.print(_model_line(loaded))
    if args.verbose:
        print(loaded.model)
    run_demo(
        loaded,
        settings,
        Path(args.out),
        console=console,
        plots=not args.no_plots,
        measure_wallclock=wallclock_measure(args.wallclock_prompts),
        measure_runtime=runtime_answers,
        extra={"model": _model_line(loaded)},
    )
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------
# calibrate / eval


def _load_task(args: argparse.Namespace, sizes: dict[str, int], stored: dict | None = None):
    from adainfer.app.lmeval_task import is_lmeval_spec, load_from_args
    from adainfer.app.tasks import load_task

    if is_lmeval_spec(args.task):  # an lm-evaluation-harness task: its own prompts and label words
        return load_from_args(args, sizes, stored)
    stored = stored or {}

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else stored.get(name, default)

    kwargs = {
        "k_shot": pick("k_shot", 4),
        "template": pick("template", "plain" if args.task == "tweet-sentiment" else "user"),
        "sizes": sizes,
        "seed": pick("seed", 0),
    }
    words = args.label_words if args.label_words is not None else stored.get("label_words_arg")
    if words:
        kwargs["label_words"] = words
    if args.task == "tweet-sentiment":
        kwargs["min_confidence"] = pick("min_confidence", 1.0)
    else:
        kwargs.update(
            text_column=pick("text_column", "text"),
            label_column=pick("label_column", "label"),
            encoding=pick("encoding", None),
        )
    return load_task(args.task, **kwargs), kwargs


def _calibrate(args: argparse.Namespace) -> int:
    from adainfer.app.loading import load_model
    from adainfer.app.pipeline import task_line
    from adainfer.calibrate.features import collect_content_free, collect_task_features
    from adainfer.calibrate.fit import calibrate_auto

    console = _console()
    exit_head = args.exit_head
    if args.vocab == "full":
        if exit_head == "probe":
            raise ValueError("--exit-head probe answers over the label tokens: it needs --vocab labels")
        exit_head = "lens"
    sizes = {"calibration": args.n_calibration, "heldout": args.n_heldout, "test": args.n_test}
    task, kwargs = _load_task(args, sizes)
    console.print(f"loading model {args.model} ...")
    loaded = load_model(args.model)
    console.print(_model_line(loaded))
    rendered = task.render(loaded.tokenizer)
    console.print(task_line(rendered, sizes))
    bias = args.bias if args.vocab == "labels" else "none"
    collect = dict(batch_size=args.batch_size, full_vocab=args.vocab == "full", keep_hidden=exit_head != "lens")
    cal = collect_task_features(loaded.model, rendered, "calibration", **collect)
    held = collect_task_features(loaded.model, rendered, "heldout", **collect)
    cf = collect_content_free(loaded.model, rendered) if bias == "content-free" else None
    info = {"task": {**_jsonable(kwargs), "task": args.task, "label_words_arg": args.label_words}}
    clf = calibrate_auto(
        cal,
        held,
        exit_head=exit_head,
        method=args.method,
        target=args.target,
        budget=args.budget,
        confidence=args.confidence,
        bias_method=bias,
        content_free=cf,
        vocab_mode=args.vocab,
        use_layer=not args.no_layer_feature,
        label_words=rendered.label_forms,
        info=info,
    )
    clf.save(args.out)
    i = clf.info
    if "exit_head_choice" in i:
        ch = i["exit_head_choice"]
        console.print(
            f"exit head: {ch['chosen']} (held-out mean exit layer: lens {ch['lens']['heldout_mean_exit_layer']:.2f}, "
            f"probe {ch['probe']['heldout_mean_exit_layer']:.2f})"
        )
    if clf.threshold is None:
        console.print("no threshold fits the budget on the held-out split: the classifier never stops early")
    else:
        console.print(
            f"threshold {clf.threshold:.4f} from layer {clf.min_layer}: held-out disagreement "
            f"{i['heldout_disagreement']:.3f} (budget {args.budget})"
            + (
                f", upper bound {i['heldout_disagreement_upper_bound']:.3f} at {args.confidence:.0%}"
                if args.confidence
                else ""
            )
            + f", mean exit layer {i['heldout_mean_exit_layer']:.2f} of {clf.n_layers}"
        )
    console.print(f"wrote {args.out}")
    return 0


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _eval(args: argparse.Namespace) -> int:
    from adainfer.app.loading import load_model
    from adainfer.app.pipeline import RunSettings, print_table, runtime_answers, target_lines, task_line, write_outputs
    from adainfer.calibrate.classifier import StopClassifier
    from adainfer.calibrate.evaluate import evaluate
    from adainfer.calibrate.features import collect_task_features

    console = _console()
    clf = StopClassifier.load(args.classifier)
    stored = dict(clf.info.get("task") or {})
    if stored.get("task") not in (None, args.task):
        console.print(f"note: the classifier was calibrated on task {stored.get('task')!r}; evaluating {args.task!r}")
        stored = {}
    sizes = dict(stored.get("sizes") or {"calibration": 300, "heldout": 300, "test": 300})
    if args.n_test:
        sizes["test"] = args.n_test
    task, _ = _load_task(args, sizes, stored)
    console.print(f"loading model {args.model} ...")
    loaded = load_model(args.model)
    console.print(_model_line(loaded))
    clf.check_compatible(loaded.model)
    rendered = task.render(loaded.tokenizer)
    if clf.label_token_ids is not None and tuple(clf.label_token_ids) != tuple(rendered.label_token_ids):
        raise ValueError(
            f"classifier was fitted for label tokens {list(clf.label_token_ids)} ({clf.label_words}); "
            f"this task's label words map to {list(rendered.label_token_ids)} ({rendered.label_forms})"
        )
    console.print(task_line(rendered, sizes))
    test = collect_task_features(
        loaded.model,
        rendered,
        "test",
        batch_size=args.batch_size,
        full_vocab=clf.vocab_mode == "full",
        keep_hidden=clf.exit_head == "probe",
    )
    measure = wallclock_measure(args.wallclock_prompts)
    metrics = evaluate(
        test,
        clf,
        measure_wallclock=measure,
        measure_runtime=runtime_answers,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        prompts=rendered.prompts("test"),
        batch_size=args.batch_size,
    )
    variant = {
        "name": f"{clf.method} ({clf.bias_method} bias, {clf.exit_head})",
        "main": True,
        "vocab_mode": clf.vocab_mode,
        "exit_head": clf.exit_head,
    }
    rows = [{"variant": variant, "classifier": clf, "metrics": metrics}]
    budget = clf.info.get("budget", float("nan"))
    print_table(rows, f"AdaInfer on {task.name}, test split ({test.n_examples} examples)", console)
    if metrics["full_accuracy"] is not None:
        for line in target_lines(rows[0], budget):
            console.print("  " + line)
    settings = RunSettings(task=args.task, sizes=sizes, budget=budget)
    out_dir = Path(args.out_dir)
    write_outputs(out_dir, rows, {"test": test}, settings, {"model": _model_line(loaded)}, plots=not args.no_plots)
    console.print(f"wrote {out_dir}/results.json")
    return 0


# --------------------------------------------------------------------------------------------


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        required=True,
        help="a bundled task (tweet-sentiment), a .csv/.tsv/.jsonl/.json file, or lmeval:NAME (an lm-eval task)",
    )
    g.add_argument("--text-column", help="text column of a task file (default: text)")
    g.add_argument("--label-column", help="label column of a task file (default: label)")
    g.add_argument(
        "--label-words",
        nargs="+",
        help="answer words, one per label in sorted label order, or label=word pairs (default: the labels)",
    )
    g.add_argument("--template", help="prompt template (plain, instruct, qa, chat, user)")
    g.add_argument("--k-shot", type=int, help="demonstrations per prompt (default 4)")
    g.add_argument("--seed", type=int, help="seed of the splits and demonstrations (default 0)")
    g.add_argument("--encoding", help="encoding of a CSV task file (e.g. latin-1)")
    g.add_argument("--min-confidence", type=float, help="tweet-sentiment: keep rows with annotator confidence >= this")
    g.add_argument("--include-path", help="lmeval:NAME tasks: folder of the lm-eval task YAML files")
    p.add_argument("--model", default="bundled", help="'bundled' or a Hugging Face model directory or .gguf file")
    p.add_argument("--batch-size", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adainfer", description="AdaInfer early exit for Hugging Face decoder models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, the native extension and which backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p_demo = sub.add_parser("demo", help="the main job: calibrate and evaluate on the bundled model and data")
    p_demo.add_argument(
        "--quick", action="store_true", help="tiny splits (16 each) and 2 shots: a smoke test, not a measurement"
    )
    p_demo.add_argument("--out", default="adainfer-results", help="output folder (results.json, PNGs)")
    p_demo.add_argument("--budget", type=float, default=0.01, help="disagreement budget with the full model")
    p_demo.add_argument("--confidence", type=float, help="hold the budget at this Clopper-Pearson confidence")
    p_demo.add_argument("--bias", default="auto", choices=BIAS_CHOICES, help=BIAS_HELP)
    p_demo.add_argument("--min-confidence", type=float, default=1.0, help="keep tweets with this annotator agreement")
    p_demo.add_argument("--template", default="plain", help="prompt template (see research/prompt_search.md)")
    p_demo.add_argument("--k-shot", type=int, default=4)
    p_demo.add_argument("--n-test", type=int, help="test examples (default 300)")
    p_demo.add_argument("--batch-size", type=int, default=32)
    p_demo.add_argument(
        "--wallclock-prompts",
        type=int,
        default=96,
        help="time the runtime (full vs AdaInfer) on this many test prompts (0: skip; default 96)",
    )
    p_demo.add_argument("--no-plots", action="store_true")
    p_demo.add_argument("-v", "--verbose", action="store_true", help="print the whole module tree")

    p_cal = sub.add_parser("calibrate", help="fit a stop classifier for a model and task, save it as JSON")
    _add_task_args(p_cal)
    p_cal.add_argument("--out", required=True, help="classifier JSON to write")
    p_cal.add_argument("--budget", type=float, default=0.01, help="disagreement budget with the full model")
    p_cal.add_argument("--confidence", type=float, help="hold the budget at this Clopper-Pearson confidence")
    p_cal.add_argument("--target", default="consistency", choices=["consistency", "gold"])
    p_cal.add_argument("--method", default="svm", choices=["svm", "logreg", "gap"])
    p_cal.add_argument("--bias", default="auto", choices=BIAS_CHOICES, help=BIAS_HELP)
    p_cal.add_argument("--vocab", default="labels", choices=["labels", "full"], help="exit head over labels or all")
    p_cal.add_argument("--no-layer-feature", action="store_true", help="features top_prob and gap only")
    p_cal.add_argument(
        "--exit-head",
        default="auto",
        choices=["auto", "lens", "probe"],
        help="decode layer k through the model's LM head (lens) or a per-layer probe of the hidden state; "
        "auto: both, keep the one that saves more layers on the held-out split",
    )
    p_cal.add_argument("--n-calibration", type=int, default=300)
    p_cal.add_argument("--n-heldout", type=int, default=300)
    p_cal.add_argument("--n-test", type=int, default=300, help="reserved for eval (kept disjoint)")

    p_eval = sub.add_parser("eval", help="evaluate a saved classifier on a task's test split")
    _add_task_args(p_eval)
    p_eval.add_argument("--classifier", required=True, help="classifier JSON from `adainfer calibrate`")
    p_eval.add_argument("--n-test", type=int, help="test examples (default: as calibrated)")
    p_eval.add_argument(
        "--wallclock-prompts", type=int, help="time the runtime on this many test prompts (0: skip; default: all)"
    )
    p_eval.add_argument("--out-dir", default="adainfer-results", help="output folder (results.json, PNGs)")
    p_eval.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    from adainfer.calibrate.classifier import ClassifierFileError

    handlers = {"demo": _demo, "calibrate": _calibrate, "eval": _eval}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, ClassifierFileError, KeyError) as exc:
        print(f"adainfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
