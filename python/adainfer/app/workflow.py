"""Calibrate and evaluate a stop classifier on a task: the work behind ``adainfer calibrate`` and
``adainfer eval``, callable from Python on a model and tokenizer already loaded.

    task = load_task("tweet-sentiment", sizes={"calibration": 400, "heldout": 400, "test": 300})
    clf = calibrate(model, tokenizer, task, budget=0.01)   # fit on calibration, threshold on heldout
    clf.save("clf.json")
    result = evaluate(model, tokenizer, task, clf)          # its figures on the test split

``calibrate_command`` / ``eval_command`` are the two commands themselves: they read the parsed
command line, load the task and the model, call ``calibrate`` / ``evaluate``, print and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adainfer.app import loading
from adainfer.app.pipeline import (
    RunSettings,
    model_line,
    print_table,
    runtime_answers,
    summary_lines,
    task_line,
    write_outputs,
)
from adainfer.app.tasks import ClassificationTask, RenderedTask
from adainfer.app.templates import TEMPLATES
from adainfer.calibration.choices import READOUT_CHOICES, VOCAB_MODES
from adainfer.calibration.classifier import StopClassifier
from adainfer.calibration.evaluate import WallclockFn
from adainfer.calibration.evaluate import evaluate as evaluate_features
from adainfer.calibration.features import LayerFeatures, collect_content_free, collect_task_features
from adainfer.calibration.fit import calibrate_auto
from adainfer.calibration.preflight import ForwardCost, preflight

DEFAULT_SIZES = {"calibration": 300, "heldout": 300, "test": 300}


def _rendered(task: ClassificationTask | RenderedTask, tokenizer) -> RenderedTask:
    return task if isinstance(task, RenderedTask) else task.render(tokenizer)


def task_info_of(rendered: RenderedTask) -> dict:
    """How to rebuild ``rendered``'s task (what ``adainfer eval`` reads from a classifier's
    ``info["task"]``): its name, shots, named template, seed, split sizes and label words."""
    task = rendered.task
    template = task.template.name if TEMPLATES.get(task.template.name) == task.template else None
    return {
        "task": task.name,
        "k_shot": len(task.demonstrations),
        "template": template,
        "seed": task.seed,
        "sizes": {s: len(examples) for s, examples in task.splits.items() if examples},
        "label_words": list(rendered.label_forms),
        "label_words_arg": list(task.label_words),
    }


def calibrate(
    model,
    tokenizer,
    task: ClassificationTask | RenderedTask,
    *,
    budget: float = 0.01,
    confidence: float | None = 0.9,
    readout: str = "auto",
    method: str = "auto",
    target: str = "consistency",
    label_bias_estimator: str = "auto",
    vocab_mode: str = "labels",
    use_layer: bool = True,
    batch_size: int = 32,
    task_info: dict | None = None,
    progress: bool = True,
) -> StopClassifier:
    """Fit a stop classifier for ``model`` on ``task``: features of the calibration and held-out
    splits (one unpatched forward pass each), a linear stop rule fitted on calibration, and the
    threshold chosen on held-out so that the disagreement with the full model stays within
    ``budget``.

    Args:
        model: a loaded ``*ForCausalLM`` of a supported family (unpatched).
        tokenizer: its tokenizer.
        task: a ``ClassificationTask`` (rendered here with ``tokenizer``) or a ``RenderedTask``;
            it needs non-empty ``calibration`` and ``heldout`` splits.
        budget: the disagreement rate with the full model allowed, in [0, 1).
        confidence: certify the budget at this level (one-sided Clopper-Pearson upper bound);
            0 or None: the point estimate on the held-out split.
        readout: ``lens``, ``probe`` or ``auto`` (each fitted on calibration; the one that runs fewer
            layers there within the budget is the one held-out certifies).
        method: ``svm`` (the paper), ``logreg``, ``gap`` or ``auto`` (chosen with the readout).
        target: ``consistency`` (the full model's answer) or ``gold`` (the gold label).
        label_bias_estimator: ``auto``, ``none``, ``content-free``, ``mean`` or ``balanced``.
        vocab_mode: ``labels`` (the exit head reads the label tokens) or ``full`` (the whole
            vocabulary; then the readout is the lens and there is no label bias).
        use_layer: give the stop rule the layer index as a third feature.
        batch_size: prompts per forward pass.
        task_info: stored as ``info["task"]`` (how to rebuild the task); default: from the task.
        progress: show progress bars.

    Returns:
        The fitted ``StopClassifier`` (``threshold`` None when no threshold meets the budget).
    """
    if vocab_mode not in VOCAB_MODES:
        raise ValueError(f"unknown vocab_mode {vocab_mode!r} (vocab modes: {', '.join(VOCAB_MODES)})")
    if readout not in READOUT_CHOICES:
        raise ValueError(f"unknown readout {readout!r} (readouts: {', '.join(READOUT_CHOICES)})")
    if vocab_mode == "full":
        if readout == "probe":
            raise ValueError("readout 'probe' answers over the label tokens: it needs vocab_mode 'labels'")
        readout, label_bias_estimator = "lens", "none"
    rendered = _rendered(task, tokenizer)
    collect = dict(
        batch_size=batch_size, full_vocab=vocab_mode == "full", keep_hidden=readout != "lens", progress=progress
    )
    cal = collect_task_features(model, rendered, "calibration", **collect)
    held = collect_task_features(model, rendered, "heldout", **collect)
    cf = collect_content_free(model, rendered, progress=progress) if label_bias_estimator == "content-free" else None
    return calibrate_auto(
        cal,
        held,
        readout=readout,
        method=method,
        target=target,
        budget=budget,
        confidence=confidence or None,
        label_bias_estimator=label_bias_estimator,
        content_free=cf,
        vocab_mode=vocab_mode,
        use_layer=use_layer,
        label_words=rendered.label_forms,
        info={"task": task_info_of(rendered) if task_info is None else task_info},
    )


def calibration_lines(clf: StopClassifier) -> list[str]:
    """What ``adainfer calibrate`` reports about a fitted classifier: the readout chosen (with
    ``auto``), and the threshold with its held-out figures."""
    info = clf.info
    lines = []
    if "rule_choice" in info:
        ch = info["rule_choice"]
        tried = ", ".join(
            f"{c['method']} {c['readout']} {c['calibration_mean_exit_layer']:.2f}" for c in ch["candidates"]
        )
        lines.append(
            f"stop rule: {ch['chosen']['method']} over the {ch['chosen']['readout']} readout "
            f"(mean exit layer on the calibration split: {tried})"
        )
    if clf.threshold is None:
        lines.append("no threshold fits the budget on the held-out split: the classifier never stops early")
    else:
        level = info.get("confidence")
        bound = f", upper bound {info['heldout_disagreement_upper_bound']:.3f} at {level:.0%}" if level else ""
        lines.append(
            f"threshold {clf.threshold:.4f} from layer {clf.min_layer}: held-out disagreement "
            f"{info['heldout_disagreement']:.3f} (budget {info['budget']}){bound}"
            f", mean exit layer {info['heldout_mean_exit_layer']:.2f} of {clf.n_layers}"
        )
    return lines


def wallclock_measure(max_prompts: int | None) -> WallclockFn | None:
    """The wall-clock measurement of the early-exit runtime (an ``adainfer.calibration.evaluate.WallclockFn``)
    over the first ``max_prompts`` test prompts (None: all; 0: not measured)."""
    if max_prompts == 0:
        return None
    from adainfer.runtime.wallclock import RuntimeWallclock

    return RuntimeWallclock(max_prompts=max_prompts)


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        metrics: ``adainfer.calibration.evaluate.METRIC_KEYS`` of ``classifier`` on the test split.
        classifier: the classifier evaluated.
        rendered: the task, bound to the tokenizer.
        features: the test split's per-layer features (what the simulated figures are computed from).
    """

    metrics: dict
    classifier: StopClassifier
    rendered: RenderedTask
    features: LayerFeatures

    def row(self) -> dict:
        """The result as a row of the results table (``adainfer.app.pipeline.print_table``)."""
        clf = self.classifier
        variant = {
            "name": f"{clf.method} ({clf.label_bias_estimator} bias, {clf.readout})",
            "main": True,
            "vocab_mode": clf.vocab_mode,
            "readout": clf.readout,
        }
        return {"variant": variant, "classifier": clf, "metrics": self.metrics}


def check_fits(classifier: StopClassifier, model, rendered: RenderedTask) -> None:
    """Raise ValueError unless ``classifier`` was fitted for this kind of model and these label tokens."""
    classifier.check_compatible(model)
    ids = classifier.label_token_ids
    if ids is not None and tuple(ids) != tuple(rendered.label_token_ids):
        raise ValueError(
            f"classifier was fitted for label tokens {list(ids)} ({classifier.label_words}); "
            f"this task's label words map to {list(rendered.label_token_ids)} ({rendered.label_forms})"
        )


def evaluate(
    model,
    tokenizer,
    task: ClassificationTask | RenderedTask,
    classifier: StopClassifier,
    *,
    batch_size: int = 32,
    wallclock_prompts: int | None = 0,
    runtime: bool = True,
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``classifier`` on ``task``'s test split: the early exit simulated from the
    features, and (``runtime``) the patched model's own answers on every test prompt.

    Args:
        model, tokenizer: the model the classifier was fitted for, and its tokenizer.
        task: a ``ClassificationTask`` or ``RenderedTask`` with a non-empty ``test`` split.
        classifier: a fitted ``StopClassifier``.
        batch_size: prompts per forward pass.
        wallclock_prompts: time the runtime (full model vs early exit) on this many test
            prompts; None: all of them; 0: not timed.
        runtime: read the answers through the patched model too (the ``runtime_*`` metrics).
        progress: show progress bars.
    """
    rendered = _rendered(task, tokenizer)
    check_fits(classifier, model, rendered)
    test = collect_task_features(
        model,
        rendered,
        "test",
        batch_size=batch_size,
        full_vocab=classifier.vocab_mode == "full",
        keep_hidden=classifier.readout == "probe",
        progress=progress,
    )
    metrics = evaluate_features(
        test,
        classifier,
        measure_wallclock=wallclock_measure(wallclock_prompts),
        measure_runtime=runtime_answers if runtime else None,
        model=model,
        tokenizer=tokenizer,
        prompts=rendered.prompts("test"),
        batch_size=batch_size,
    )
    return Evaluation(metrics=metrics, classifier=classifier, rendered=rendered, features=test)


# --------------------------------------------------------------------------------------------
# The commands: parsed command line -> task, model, the work above, console and files


def load_task_from_args(args, sizes: dict[str, int], stored: dict | None = None):
    """The task the command line names, with ``sizes``: (task, the settings to store with a
    classifier). An option not given falls back to ``stored`` (a classifier's ``info["task"]``),
    then to the default."""
    from adainfer.app.datasets import BUNDLED_TASKS, TWEET3_TASK, TWEET_TASK
    from adainfer.app.lmeval_task import is_lmeval_spec, load_from_args
    from adainfer.app.tasks import load_task

    if is_lmeval_spec(args.task):  # an lm-evaluation-harness task: its own prompts and label words
        return load_from_args(args, sizes, stored)
    stored = stored or {}

    def pick(name, default, stored_name=None):
        value = getattr(args, name, None)
        return value if value is not None else stored.get(stored_name or name, default)

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
    if args.task in (TWEET_TASK, TWEET3_TASK):
        kwargs["min_confidence"] = pick("min_agreement", 1.0, stored_name="min_confidence")
    else:
        kwargs.update(
            text_column=pick("text_column", "text"),
            label_column=pick("label_column", "label"),
            encoding=pick("encoding", None),
        )
    return load_task(args.task, **kwargs), kwargs


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _console(console):
    if console is not None:
        return console
    from rich.console import Console

    return Console()


def _load_model(name: str, console, dtype: str = "float32"):
    resolved = loading.resolve_dtype(dtype)
    console.print(f"loading model {name} ({loading.dtype_name(resolved)}) ...")
    loaded = loading.load_model(name, resolved)
    console.print(model_line(loaded))
    return loaded


def calibrate_command(args, console=None) -> int:
    """``adainfer calibrate``: fit a classifier and write it (``--out-dir DIR``: DIR/classifier.json;
    the deprecated ``--out FILE``: FILE)."""
    console = _console(console)
    sizes = {"calibration": args.n_calibration, "heldout": args.n_heldout, "test": args.n_test}
    task, kwargs = load_task_from_args(args, sizes)
    loaded = _load_model(args.model, console, args.dtype)
    rendered = task.render(loaded.tokenizer)
    sizes = {s: len(examples) for s, examples in task.splits.items()}  # the held-out split's "rest" resolved
    kwargs = {**kwargs, "sizes": sizes}
    console.print(task_line(rendered, sizes))
    cost = _forward_cost(loaded, rendered, args.batch_size, args.vocab, console)
    clf = calibrate(
        loaded.model,
        loaded.tokenizer,
        rendered,
        budget=args.budget,
        confidence=args.confidence,
        readout=args.readout,
        method=args.method,
        target=args.target,
        label_bias_estimator=args.label_bias,
        vocab_mode=args.vocab,
        use_layer=not args.no_layer_feature,
        batch_size=args.batch_size,
        task_info={**_jsonable(kwargs), "task": args.task, "label_words_arg": args.label_words},
    )
    report = preflight(clf, cost)
    dtype = loading.dtype_name(next(loaded.model.parameters()).dtype)
    clf = clf.with_threshold(clf.threshold, preflight=report.to_dict(), dtype=dtype)
    out = Path(args.out_dir) / "classifier.json" if args.out_dir is not None else Path(args.out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    clf.save(out)
    for line in calibration_lines(clf) + report.lines():
        console.print(line)
    if dtype != "float32":
        # measured on the bundled task in bf16: exits equal the simulation's on 85-87% of the prompts
        console.print(
            f"note: the bound is certified on the feature pass's {dtype} numerics; the runtime's {dtype} hidden "
            "states differ from them in their last bits, enough to move some exits (README, bf16): "
            "`adainfer eval` measures the runtime's own disagreement"
        )
    console.print(f"wrote {out}")
    return 0


def _forward_cost(loaded, rendered: RenderedTask, batch_size: int, vocab: str, console) -> ForwardCost | None:
    """Before the work: time the feature pass on one batch and say how long reading every prompt will
    take; and time the model's forward at ``batch_size`` and a quarter of it (the pre-flight's cost
    model). None (nothing timed) when the held-out split has fewer than ``batch_size`` prompts."""
    import time

    from adainfer.app.costs import measure_forward_cost
    from adainfer.calibration.features import collect_features

    n_read = sum(len(rendered.task.split(s)) for s in ("calibration", "heldout"))
    suffixes = rendered.suffixes("heldout")
    if len(suffixes) < batch_size:
        console.print(f"reading {n_read} prompts (too few held-out prompts to time a batch of {batch_size})")
        return None

    def read(rows: list[str]) -> float:
        t0 = time.perf_counter()
        collect_features(
            loaded.model,
            loaded.tokenizer,
            rendered.prefix,
            rows,
            None,
            rendered.label_token_ids,
            batch_size=batch_size,
            full_vocab=vocab == "full",
            keep_hidden=True,
            progress=False,
        )
        return time.perf_counter() - t0

    read(suffixes[:2])  # warm-up: the first forward of a process runs slower (one-time setup)
    per_prompt = read(suffixes[:batch_size]) / batch_size
    console.print(
        f"reading {n_read} prompts through every layer: about {n_read * per_prompt:.0f} s here "
        f"(one batch of {batch_size} timed: {per_prompt * 1e3:.0f} ms a prompt)"
    )
    return measure_forward_cost(loaded.model, loaded.tokenizer, rendered.prompts("heldout"), batch_size)


def eval_command(args, console=None) -> int:
    """``adainfer eval``: evaluate a saved classifier on the test split of the task it was
    calibrated on (rebuilt from its stored settings, options given winning); print the table and
    write ``results.json`` (+ PNGs) into ``--out-dir``."""
    console = _console(console)
    clf = StopClassifier.load(args.classifier)
    stored = dict(clf.info.get("task") or {})
    if stored.get("task") not in (None, args.task):
        console.print(f"note: the classifier was calibrated on task {stored.get('task')!r}; evaluating {args.task!r}")
        stored = {}
    sizes = dict(stored.get("sizes") or DEFAULT_SIZES)
    if args.n_test:
        sizes["test"] = args.n_test
    task, task_kwargs = load_task_from_args(args, sizes, stored)
    loaded = _load_model(args.model, console, args.dtype or clf.info.get("dtype", "float32"))
    rendered = task.render(loaded.tokenizer)
    check_fits(clf, loaded.model, rendered)
    console.print(task_line(rendered, sizes))
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        rendered,
        clf,
        batch_size=args.batch_size,
        wallclock_prompts=args.wallclock_prompts,
    )
    rows = [result.row()]
    budget = clf.info.get("budget", float("nan"))
    test = result.features
    print_table(rows, f"AdaInfer on {task.name}, test split ({test.n_examples} examples)", console)
    if result.metrics["full_accuracy"] is not None:
        for line in summary_lines(rows[0], budget):
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
    extra = {"model": model_line(loaded), "task": task_settings, "classifier_file": str(args.classifier)}
    out_dir = Path(args.out_dir)
    write_outputs(out_dir, rows, {"test": test}, settings, extra, plots=not args.no_plots)
    console.print(f"wrote {out_dir}/results.json")
    return 0
