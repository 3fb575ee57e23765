"""The ``adainfer`` command line: ``info``, ``demo`` (the main job), ``calibrate``, ``eval``.

adainfer demo [--quick] [--out DIR]
adainfer calibrate --model bundled|PATH --task tweet-sentiment|FILE|lmeval:NAME --out clf.json [options]
adainfer eval --model bundled|PATH --task tweet-sentiment|FILE --classifier clf.json [options]
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import sys
import time
from pathlib import Path

# Never download at run time: everything the CLI loads is installed locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Calibration 400: the probes need it (research/probe_curve.md: layers saved 0.30 at 100, 0.36 at 200,
# more at 400); the lens does not care. Held-out 400 resolves a 1% budget in steps of 0.25%.
DEMO_SIZES = {"calibration": 400, "heldout": 400, "test": 300}
BIAS_CHOICES = ["auto", "none", "content-free", "mean", "balanced"]
CONFIDENCE_HELP = (
    "certify the budget at this confidence (Clopper-Pearson, fixed-sequence thresholds; default 0.9); "
    "0: the point estimate on the held-out split, which does not hold on new data"
)
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
        label_bias_estimator=args.bias,
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
    from adainfer.app.tasks import BUNDLED_TASKS, load_task

    if is_lmeval_spec(args.task):  # an lm-evaluation-harness task: its own prompts and label words
        return load_from_args(args, sizes, stored)
    stored = stored or {}

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else stored.get(name, default)

    kwargs = {
        "k_shot": pick("k_shot", 4),
        # a bundled task brings its own wording (tweets: plain, movie reviews: review); files: user
        "template": pick("template", None if args.task in BUNDLED_TASKS else "user"),
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
    from adainfer.calibration.features import collect_content_free, collect_task_features
    from adainfer.calibration.fit import calibrate_auto

    console = _console()
    readout = args.readout
    if args.vocab == "full":
        if readout == "probe":
            raise ValueError("--readout probe answers over the label tokens: it needs --vocab labels")
        readout = "lens"
    sizes = {"calibration": args.n_calibration, "heldout": args.n_heldout, "test": args.n_test}
    task, kwargs = _load_task(args, sizes)
    console.print(f"loading model {args.model} ...")
    loaded = load_model(args.model)
    console.print(_model_line(loaded))
    rendered = task.render(loaded.tokenizer)
    console.print(task_line(rendered, sizes))
    bias = args.bias if args.vocab == "labels" else "none"
    collect = dict(batch_size=args.batch_size, full_vocab=args.vocab == "full", keep_hidden=readout != "lens")
    cal = collect_task_features(loaded.model, rendered, "calibration", **collect)
    held = collect_task_features(loaded.model, rendered, "heldout", **collect)
    cf = collect_content_free(loaded.model, rendered) if bias == "content-free" else None
    info = {"task": {**_jsonable(kwargs), "task": args.task, "label_words_arg": args.label_words}}
    clf = calibrate_auto(
        cal,
        held,
        readout=readout,
        method=args.method,
        target=args.target,
        budget=args.budget,
        confidence=args.confidence or None,
        label_bias_estimator=bias,
        content_free=cf,
        vocab_mode=args.vocab,
        use_layer=not args.no_layer_feature,
        label_words=rendered.label_forms,
        info=info,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    clf.save(args.out)
    i = clf.info
    if "readout_choice" in i:
        ch = i["readout_choice"]
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
    from adainfer.calibration.classifier import StopClassifier
    from adainfer.calibration.evaluate import evaluate
    from adainfer.calibration.features import collect_task_features

    console = _console()
    clf = StopClassifier.load(args.classifier)
    stored = dict(clf.info.get("task") or {})
    if stored.get("task") not in (None, args.task):
        console.print(f"note: the classifier was calibrated on task {stored.get('task')!r}; evaluating {args.task!r}")
        stored = {}
    sizes = dict(stored.get("sizes") or {"calibration": 300, "heldout": 300, "test": 300})
    if args.n_test:
        sizes["test"] = args.n_test
    task, task_kwargs = _load_task(args, sizes, stored)
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
        keep_hidden=clf.readout == "probe",
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
        "name": f"{clf.method} ({clf.label_bias_estimator} bias, {clf.readout})",
        "main": True,
        "vocab_mode": clf.vocab_mode,
        "readout": clf.readout,
    }
    rows = [{"variant": variant, "classifier": clf, "metrics": metrics}]
    budget = clf.info.get("budget", float("nan"))
    print_table(rows, f"AdaInfer on {task.name}, test split ({test.n_examples} examples)", console)
    if metrics["full_accuracy"] is not None:
        for line in target_lines(rows[0], budget):
            console.print("  " + line)
    # what this run used (the options, else the classifier's stored task settings, else the defaults)
    settings = RunSettings(
        task=args.task,
        k_shot=task_kwargs.get("k_shot", len(task.demonstrations)),
        template=task_kwargs.get("template") or task.template.name,
        label_words=rendered.label_forms,
        sizes=sizes,
        min_confidence=task_kwargs.get("min_confidence"),
        seed=task_kwargs.get("seed", task.seed),
        budget=budget,
        confidence=clf.info.get("confidence"),
        label_bias_estimator=clf.label_bias_estimator,
        batch_size=args.batch_size,
        full_vocab=clf.vocab_mode == "full",
    )
    task_settings = {**_jsonable(task_kwargs), "task": args.task, "label_words_arg": task_kwargs.get("label_words")}
    extra = {"model": _model_line(loaded), "task": task_settings, "classifier_file": str(args.classifier)}
    out_dir = Path(args.out_dir)
    write_outputs(out_dir, rows, {"test": test}, settings, extra, plots=not args.no_plots)
    console.print(f"wrote {out_dir}/results.json")
    return 0


# --------------------------------------------------------------------------------------------
# Argument types: every value is checked when it is parsed, before any work (argparse reports a bad
# one as `adainfer <cmd>: error: argument --x: <problem>`, exit 2). Defaults given as strings are
# parsed by the same types.


def _integer(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {what}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range; {what}")
        return value

    parse.__name__ = "integer"
    return parse


def _number(lo: float, hi: float, *, lo_open: bool, hi_open: bool, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {what}") from None
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {what}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = _integer(1, "use a positive integer")
SPLIT_SIZE = _integer(1, "use a positive number of examples")
NON_NEGATIVE = _integer(0, "use an integer >= 0")
BUDGET = _number(0.0, 1.0, lo_open=False, hi_open=True, what="the disagreement budget is a rate in [0, 1), e.g. 0.01")
CONFIDENCE = _number(
    0.0, 1.0, lo_open=False, hi_open=True, what="the confidence is a level in [0, 1), e.g. 0.9 (0: the point estimate)"
)
AGREEMENT = _number(0.0, 1.0, lo_open=False, hi_open=False, what="annotator agreement is in [0, 1] (0 keeps all)")
TASK_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _nonblank(what: str):
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be blank")
        return text

    parse.__name__ = "text"
    return parse


def _label_word(text: str) -> str:
    word = text.split("=", 1)[1] if "=" in text else text
    if not word.strip():
        raise argparse.ArgumentTypeError(f"label word {text!r} is blank: give one word per label (or label=word)")
    return text


def _encoding(text: str) -> str:
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252)") from None
    return text


def _task(text: str) -> str:
    from adainfer.app.tasks import BUNDLED_TASKS

    if text in BUNDLED_TASKS or text.startswith("lmeval:"):
        return text  # lm-eval tasks are resolved (and their errors reported) when loaded
    path = Path(text)
    if path.suffix.lower() not in TASK_SUFFIXES and not path.exists():
        raise argparse.ArgumentTypeError(
            f"unknown task {text!r}: use a bundled task ({', '.join(BUNDLED_TASKS)}), a "
            f"{'/'.join(TASK_SUFFIXES)} file or lmeval:NAME"
        )
    if not path.exists():
        raise argparse.ArgumentTypeError(f"task file not found: {path}")
    if path.is_dir() or path.suffix.lower() not in TASK_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{path} is not a task file: use a {'/'.join(TASK_SUFFIXES)} file")
    return text


def _model(text: str) -> str:
    from adainfer.app.loading import BUNDLED_NAME

    if text in ("bundled", BUNDLED_NAME):
        return text
    path = Path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"GGUF file not found: {path}")
    elif not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{path} is not a Hugging Face model directory (no config.json) nor a .gguf file; or use 'bundled'"
        )
    return text


def _classifier(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a directory: pass the classifier JSON file (e.g. {path / 'classifier.json'})"
        )
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"classifier file not found: {path} (write one with `adainfer calibrate`)")
    return text


def _writable_parent(path: Path) -> None:
    """The nearest existing folder above ``path`` (created later) is a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable")


def _output_dir(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is an existing file; the output is a folder: choose another path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write into {path}: the folder is not writable")
    else:
        _writable_parent(path)
    return text


def _output_file(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a folder: give the classifier file's path (e.g. {path / 'clf.json'})"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot overwrite {path}: the file is not writable")
    _writable_parent(path)
    return text


class _Parser(argparse.ArgumentParser):
    """Every usage error is one line on stderr, ``adainfer <cmd>: error: <problem and fix>``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _task_option_problem(args: argparse.Namespace) -> str | None:
    """Options that apply to one kind of task only are refused for the other (they were ignored)."""
    from adainfer.app.tasks import BUNDLED_TASKS

    bundled = args.task in BUNDLED_TASKS
    for option in ("text_column", "label_column", "encoding"):
        if bundled and getattr(args, option) is not None:
            return f"--{option.replace('_', '-')} applies to task files only, not to {args.task}"
    if not bundled and args.min_confidence is not None:
        return f"--min-confidence applies to the tweet-sentiment task only, not to a task file ({args.task})"
    return None


def _add_task_args(p: argparse.ArgumentParser) -> None:
    from adainfer.app.tasks import TEMPLATES

    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        required=True,
        type=_task,
        help="a bundled task (tweet-sentiment, movie-reviews), a .csv/.tsv/.jsonl/.json file, or lmeval:NAME",
    )
    g.add_argument("--text-column", type=_nonblank("--text-column"), help="text column of a task file (default: text)")
    g.add_argument(
        "--label-column", type=_nonblank("--label-column"), help="label column of a task file (default: label)"
    )
    g.add_argument(
        "--label-words",
        nargs="+",
        type=_label_word,
        help="answer words, one per label in sorted label order, or label=word pairs (default: the labels)",
    )
    g.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: plain; user for files)")
    g.add_argument("--k-shot", type=NON_NEGATIVE, help="demonstrations per prompt, >= 0 (default 4)")
    g.add_argument("--seed", type=NON_NEGATIVE, help="seed of the splits and demonstrations, >= 0 (default 0)")
    g.add_argument("--encoding", type=_encoding, help="encoding of a CSV/TSV task file (e.g. latin-1)")
    g.add_argument(
        "--min-confidence", type=AGREEMENT, help="tweet-sentiment: keep rows with annotator confidence >= this"
    )
    g.add_argument("--include-path", help="lmeval:NAME tasks: folder of the lm-eval task YAML files")
    p.add_argument(
        "--model", default="bundled", type=_model, help="'bundled' or a Hugging Face model directory or .gguf file"
    )
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="prompts per forward pass (default 32)")


def build_parser() -> argparse.ArgumentParser:
    from adainfer.app.tasks import TEMPLATES

    parser = _Parser(prog="adainfer", description="AdaInfer early exit for Hugging Face decoder models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, the native extension and which backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p_demo = sub.add_parser("demo", help="the main job: calibrate and evaluate on the bundled model and data")
    p_demo.add_argument(
        "--quick", action="store_true", help="tiny splits (16 each) and 2 shots: a smoke test, not a measurement"
    )
    p_demo.add_argument(
        "--out", default="adainfer-results", type=_output_dir, help="output folder (results.json, PNGs)"
    )
    p_demo.add_argument(
        "--budget", type=BUDGET, default=0.01, help="disagreement budget with the full model, in [0, 1)"
    )
    p_demo.add_argument("--confidence", type=CONFIDENCE, default=0.9, help=CONFIDENCE_HELP)
    p_demo.add_argument("--bias", default="auto", choices=BIAS_CHOICES, help=BIAS_HELP)
    p_demo.add_argument(
        "--min-confidence", type=AGREEMENT, default=1.0, help="keep tweets with this annotator agreement, in [0, 1]"
    )
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
        "--wallclock-prompts",
        type=NON_NEGATIVE,
        default=96,
        help="time the runtime (full vs AdaInfer) on this many test prompts (0: skip; default 96)",
    )
    p_demo.add_argument("--no-plots", action="store_true")
    p_demo.add_argument("-v", "--verbose", action="store_true", help="print the whole module tree")

    p_cal = sub.add_parser("calibrate", help="fit a stop classifier for a model and task, save it as JSON")
    _add_task_args(p_cal)
    p_cal.add_argument("--out", required=True, type=_output_file, help="classifier JSON to write")
    p_cal.add_argument("--budget", type=BUDGET, default=0.01, help="disagreement budget with the full model, in [0, 1)")
    p_cal.add_argument("--confidence", type=CONFIDENCE, default=0.9, help=CONFIDENCE_HELP)
    p_cal.add_argument("--target", default="consistency", choices=["consistency", "gold"])
    p_cal.add_argument("--method", default="svm", choices=["svm", "logreg", "gap"])
    p_cal.add_argument("--bias", default="auto", choices=BIAS_CHOICES, help=BIAS_HELP)
    p_cal.add_argument("--vocab", default="labels", choices=["labels", "full"], help="exit head over labels or all")
    p_cal.add_argument("--no-layer-feature", action="store_true", help="features top_prob and gap only")
    p_cal.add_argument(
        "--readout",
        default="auto",
        choices=["auto", "lens", "probe"],
        help="decode layer k through the model's LM head (lens) or a per-layer probe of the hidden state; "
        "auto: both, keep the one that saves more layers on the held-out split",
    )
    p_cal.add_argument("--n-calibration", type=SPLIT_SIZE, default=400, help="fits the stop rule and probes (400)")
    p_cal.add_argument("--n-heldout", type=SPLIT_SIZE, default=400, help="examples to threshold on (default 400)")
    p_cal.add_argument("--n-test", type=SPLIT_SIZE, default=300, help="reserved for eval (kept disjoint)")

    p_eval = sub.add_parser("eval", help="evaluate a saved classifier on a task's test split")
    _add_task_args(p_eval)
    p_eval.add_argument(
        "--classifier", required=True, type=_classifier, help="classifier JSON from `adainfer calibrate`"
    )
    p_eval.add_argument("--n-test", type=SPLIT_SIZE, help="test examples (default: as calibrated)")
    p_eval.add_argument(
        "--wallclock-prompts",
        type=NON_NEGATIVE,
        help="time the runtime on this many test prompts (0: skip; default: all)",
    )
    p_eval.add_argument(
        "--out-dir", default="adainfer-results", type=_output_dir, help="output folder (results.json, PNGs)"
    )
    p_eval.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for every user error, with one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: a usage error (2, reported) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    problem = _task_option_problem(args) if args.command in ("calibrate", "eval") else None
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
