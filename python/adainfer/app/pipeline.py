"""The end-to-end job behind ``adainfer demo``: collect the per-layer features of a task's splits
once, fit and threshold stop classifiers, evaluate them side by side, and write ``results.json``
plus PNG plots; and the presentation ``adainfer calibrate`` / ``eval`` share (the table, the
summary lines, the output files).

The variants of the demo table (all from the same features, so the comparison is exact):

    M + bias (chosen)   the main row: the readout (lens / probe) and rule M (gap / svm) that
                        ``adainfer calibrate`` chooses on the calibration split (``choose_rule``)
    svm + bias       LinearSVC (paper) over the lens, label tokens, per-layer label-bias correction
    probe svm + bias the same rule over the per-layer probes (the default before the choice)
    probe, no bound / svm + bias, no bound   the point estimate on held-out instead of the bound
    svm, raw         the lens svm without the correction (the full model's answer is raw too)
    logreg + bias    logistic regression instead of the SVM
    svm gold + bias  the paper's target (gold label) instead of consistency
    gap + bias       the plain gap-threshold baseline
    gap, raw         the same without the correction
    svm full-vocab   exit head over the whole vocabulary (no label restriction, no correction)

Every threshold is chosen on the held-out split under the same disagreement budget (certified at
the run's confidence unless "no bound"); every figure is measured on the test split.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np

from adainfer.calibration.choices import LABEL_BIAS_ESTIMATORS
from adainfer.calibration.classifier import StopClassifier
from adainfer.calibration.evaluate import RuntimeFn, WallclockFn, evaluate, per_layer_table, simulate, threshold_sweep
from adainfer.calibration.features import LayerFeatures, collect_content_free, collect_task_features, label_signals
from adainfer.calibration.fit import calibrate
from adainfer.calibration.fit import choose_rule as choose_rule_on_calibration
from adainfer.calibration.labelbias import estimate_label_bias

NOT_MEASURED = "not measured"
SWEEP_BUDGETS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Variant:
    """One classifier configuration of the side-by-side table."""

    name: str
    method: str = "svm"
    label_bias_estimator: str = "auto"
    vocab_mode: str = "labels"
    target: str = "consistency"
    confidence: float | None = None  # None: the run's setting; 0: the point estimate (no bound)
    main: bool = False
    readout: str = "lens"


def demo_variants(
    label_bias_estimator: str,
    full_vocab: bool = True,
    bound: float = 0.9,
    main_rule: tuple[str, str] = ("lens", "svm"),
) -> list[Variant]:
    """The table's rows: the main row first (``main_rule`` = (readout, method), what
    ``adainfer calibrate`` chooses by default: measured through the runtime and timed), then the
    paper's lens svm and the probe svm (the defaults before the choice), then the ablations (lens)."""
    readout, method = main_rule
    main = Variant(
        f"{method} {readout} + bias (chosen)", method=method, label_bias_estimator=label_bias_estimator, readout=readout
    )
    variants = [
        dataclass_replace(main, main=True),
        Variant("svm + bias", label_bias_estimator=label_bias_estimator),
        Variant("probe svm + bias", label_bias_estimator=label_bias_estimator, readout="probe"),
        Variant("probe, no bound", label_bias_estimator=label_bias_estimator, readout="probe", confidence=0.0),
        Variant("svm + bias, no bound", label_bias_estimator=label_bias_estimator, confidence=0.0),
        Variant("svm, raw", label_bias_estimator="none"),
        Variant("logreg + bias", method="logreg", label_bias_estimator=label_bias_estimator),
        Variant("svm gold + bias", label_bias_estimator=label_bias_estimator, target="gold"),
        Variant("gap + bias", method="gap", label_bias_estimator=label_bias_estimator),
        Variant("gap, raw", method="gap", label_bias_estimator="none"),
    ]
    if full_vocab:
        variants.append(Variant("svm full-vocab", label_bias_estimator="none", vocab_mode="full"))
    return variants


@dataclass
class RunSettings:
    """What a job runs with; saved in results.json."""

    task: str = "tweet-sentiment"
    k_shot: int = 4
    template: str = "plain"
    label_words: tuple[str, ...] | None = None
    sizes: dict[str, int] = field(default_factory=lambda: {"calibration": 400, "heldout": 400, "test": 300})
    min_confidence: float = 1.0
    seed: int = 0
    budget: float = 0.01
    # 0.9: the budget is certified at 90% confidence (research/probe_curve.md: the point estimate
    # kept 1% on new data in only 5-9 of 20 re-draws); 0 or None: the point estimate on held-out
    confidence: float | None = 0.9
    label_bias_estimator: str = "auto"
    batch_size: int = 32
    full_vocab: bool = True
    readout: str = "auto"  # the main row's: lens, probe, or auto (chosen on the calibration split)
    method: str = "auto"  # the main row's: svm, logreg, gap, or auto (chosen with the readout)


# --------------------------------------------------------------------------------------------
# Running


def collect_splits(
    model,
    rendered,
    splits: list[str],
    *,
    batch_size: int,
    full_vocab: bool,
    keep_hidden: bool = True,
    progress: bool = True,
) -> dict[str, LayerFeatures]:
    """Features of each split (with the hidden states probes need), plus the content-free prompts
    (key ``content-free``)."""
    collect = dict(batch_size=batch_size, full_vocab=full_vocab, keep_hidden=keep_hidden, progress=progress)
    feats = {s: collect_task_features(model, rendered, s, **collect) for s in splits}
    feats["content-free"] = collect_content_free(model, rendered, batch_size=batch_size, progress=False)
    return feats


def run_variant(
    variant: Variant,
    feats: dict[str, LayerFeatures],
    settings: RunSettings,
    label_words: tuple[str, ...] | None,
    info: dict,
    *,
    measure_wallclock: WallclockFn | None = None,
    measure_runtime: RuntimeFn | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompts: list[str] | None = None,
) -> dict:
    """Calibrate one variant (fit on calibration, threshold on held-out) and evaluate it on test.

    The wall clock and the runtime's own answers, when measures are given, are taken for the main
    variant only.
    """
    clf = calibrate(
        feats["calibration"],
        feats["heldout"],
        readout=variant.readout,
        method=variant.method,
        target=variant.target,
        budget=settings.budget,
        confidence=_confidence(settings.confidence if variant.confidence is None else variant.confidence),
        label_bias_estimator=variant.label_bias_estimator,
        content_free=feats.get("content-free"),
        vocab_mode=variant.vocab_mode,
        label_words=label_words,
        info=info,
    )
    metrics = evaluate(
        feats["test"],
        clf,
        measure_wallclock=measure_wallclock if variant.main else None,
        measure_runtime=measure_runtime if variant.main else None,
        model=model,
        tokenizer=tokenizer,
        prompts=prompts,
        batch_size=settings.batch_size,
    )
    return {"variant": asdict(variant), "classifier": clf, "metrics": metrics}


def choose_rule(feats: dict[str, LayerFeatures], settings: RunSettings) -> tuple[str, str]:
    """The main row's (readout, method): the settings, or where ``auto``, the rule that runs the
    fewest layers on the calibration split within the budget (``adainfer.calibration.fit.choose_rule``;
    never the held-out or test split)."""
    readout, method, _ = choose_rule_on_calibration(
        feats["calibration"],
        settings.readout,
        settings.method,
        budget=settings.budget,
        label_bias_estimator=settings.label_bias_estimator,
        content_free=feats.get("content-free"),
    )
    return readout, method


def _confidence(value: float | None) -> float | None:
    """0 (or None) means the point estimate on held-out; else the certification level."""
    return value if value else None


def budget_sweep(feats: dict[str, LayerFeatures], variant: Variant, budgets=SWEEP_BUDGETS) -> list[dict]:
    """What a user gets per budget: calibrate at each budget (held-out), measure on test."""
    points = []
    settings = RunSettings()
    for b in budgets:
        settings.budget = b
        r = run_variant(variant, feats, settings, None, {})
        m = r["metrics"]
        points.append(
            {
                "budget": b,
                "pruning_ratio": m["pruning_ratio"],
                "flops_saved": m["flops_saved"],
                "adainfer_accuracy": m["adainfer_accuracy"],
                "agreement": m["agreement"],
                "min_layer": r["classifier"].min_layer,
            }
        )
    return points


def bias_comparison(feats: dict[str, LayerFeatures]) -> dict[str, dict]:
    """Test accuracy of each label-bias estimator (fitted on the calibration split): at layer L,
    and averaged over the last third of the layers (where early exits happen)."""
    test = feats["test"]
    late = slice(2 * test.n_layers // 3, None)
    out = {}
    for method in LABEL_BIAS_ESTIMATORS:
        if method == "balanced" and test.n_labels != 2:
            continue
        bias = estimate_label_bias(method, feats["calibration"], feats.get("content-free"))
        _, _, pred = label_signals(test, bias)
        out[method] = {
            "final_accuracy": float(np.mean(pred[:, -1] == test.labels)),
            "late_layers_accuracy": float(np.mean(pred[:, late] == test.labels[:, None])),
        }
    return out


def run_demo(
    loaded,
    settings: RunSettings,
    out_dir: Path | None,
    *,
    console=None,
    plots: bool = True,
    progress: bool = True,
    measure_wallclock: WallclockFn | None = None,
    measure_runtime: RuntimeFn | None = None,
    extra: dict | None = None,
) -> dict:
    """The demo: bundled tweet task, features once, every variant, table, results.json and PNGs.

    Returns the results payload (also written to ``out_dir/results.json`` when ``out_dir`` is set).
    """
    from rich.console import Console

    from adainfer.app.datasets import tweet_sentiment

    console = console or Console(width=200)
    t0 = time.perf_counter()
    task = tweet_sentiment(
        k_shot=settings.k_shot,
        template=settings.template,
        sizes=settings.sizes,
        seed=settings.seed,
        min_confidence=settings.min_confidence,
        **({"label_words": settings.label_words} if settings.label_words else {}),
    )
    rendered = task.render(loaded.tokenizer)
    settings.label_words = rendered.label_forms
    console.print(task_line(rendered, settings.sizes))
    feats = collect_splits(
        loaded.model,
        rendered,
        list(settings.sizes),
        batch_size=settings.batch_size,
        full_vocab=settings.full_vocab,
        progress=progress,
    )
    t_features = time.perf_counter() - t0
    info = {"task": task_info(settings.task, settings)}
    main_rule = choose_rule(feats, settings)
    measured = measure_wallclock is not None or measure_runtime is not None
    prompts = rendered.prompts("test") if measured else None
    rows = [
        run_variant(
            v,
            feats,
            settings,
            rendered.label_forms,
            info,
            measure_wallclock=measure_wallclock,
            measure_runtime=measure_runtime,
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            prompts=prompts,
        )
        for v in demo_variants(settings.label_bias_estimator, settings.full_vocab, main_rule=main_rule)
    ]
    budget_txt = f"{settings.budget:.1%} disagreement budget" + (
        f" at {settings.confidence:.0%} confidence" if settings.confidence else ""
    )
    title = f"AdaInfer on {task.name}, test split ({len(task.split('test'))} examples), {budget_txt}"
    print_table(rows, title, console)
    main = next(r for r in rows if r["variant"]["main"])
    for line in summary_lines(main, settings.budget):
        console.print("  " + line)
    comparison = bias_comparison(feats)
    console.print(
        "label-bias estimators (fitted on calibration), final-layer test accuracy: "
        + ", ".join(f"{k} {v['final_accuracy']:.3f}" for k, v in comparison.items())
    )
    main_variant = Variant(**main["variant"])
    payload_extra = {
        **(extra or {}),
        "task": task_info(settings.task, settings),
        "bias_estimators": comparison,
        "budget_sweep": {main_variant.name: budget_sweep(feats, main_variant)},
        "seconds": {"features": t_features, "total": time.perf_counter() - t0},
    }
    if out_dir is None:
        return {"rows": rows, **payload_extra}
    payload = write_outputs(out_dir, rows, feats, settings, payload_extra, plots=plots)
    console.print(
        f"wrote {out_dir}/results.json, classifier.json"
        + ("" if not plots else ", exit_layers.png, accuracy_vs_savings.png, per_layer.png")
    )
    return payload


def runtime_answers(model, tokenizer, prompts: list[str], clf: StopClassifier, batch_size: int) -> dict:
    """The ``RuntimeFn`` of the demo and ``eval``: ``adainfer.classify`` over every prompt, in the
    classifier's answer space, full-depth answers label-bias corrected as the simulation's."""
    from adainfer.app.classify import classify

    correct = clf.vocab_mode == "labels" and clf.label_bias is not None
    result = classify(model, tokenizer, prompts, clf, batch_size=batch_size, correct_full_depth=correct)
    answers = result.label_index if clf.vocab_mode == "labels" else result.answer_token
    return {"answers": answers, "exit_layers": result.exit_layers}


# --------------------------------------------------------------------------------------------
# Presentation

TABLE_COLUMNS = (
    ("variant", "variant"),
    ("full acc", "full_accuracy"),
    ("AdaInfer acc", "adainfer_accuracy"),
    ("agree", "agreement"),
    ("exit layer", "mean_exit_layer"),
    ("pruning", "pruning_ratio"),
    ("oracle", "oracle_pruning_ratio"),
    ("of oracle", "savings_vs_oracle"),
    ("FLOPs saved", "flops_saved"),
    ("checks", "checks_per_row"),
    ("from", "min_layer"),
    ("runtime acc", "runtime_accuracy"),
    ("= sim", "runtime_matches_simulation"),
    ("wall clock", "wallclock"),
)


def _fmt(key: str, value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if key in ("mean_exit_layer", "checks_per_row"):
        return f"{value:.2f}"
    if key == "savings_vs_oracle":
        return f"{value:.0%}"
    return f"{value:.3f}"


def wallclock_cell(metrics: dict) -> str:
    if metrics.get("speedup") is None:
        return NOT_MEASURED
    return (
        f"{metrics['speedup']:.2f}x ({metrics['wallclock_full_s']:.1f}/{metrics['wallclock_adainfer_s']:.1f} s, "
        f"{metrics['speedup_vs_ideal']:.0%} of ideal)"
    )


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The side-by-side table as strings, one list per variant (columns: ``TABLE_COLUMNS``)."""
    out = []
    for r in rows:
        clf: StopClassifier = r["classifier"]
        values = {
            **r["metrics"],
            "variant": r["variant"]["name"],
            "min_layer": str(clf.min_layer) if clf.threshold is not None else "never",
            "wallclock": wallclock_cell(r["metrics"]),
        }
        out.append([_fmt(key, values[key]) for _, key in TABLE_COLUMNS])
    return out


def print_table(rows: list[dict], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    table = Table(title=title)
    for header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="left" if header == "variant" else "right", no_wrap=True)
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)


def task_line(rendered, sizes) -> str:
    task = rendered.task
    words = "/".join(repr(w) for w in rendered.label_forms)
    return (
        f"task {task.name}: labels {'/'.join(task.label_names)} -> tokens {words} {list(rendered.label_token_ids)}, "
        f"template {task.template.name!r}, {len(task.demonstrations)}-shot, splits "
        + ", ".join(f"{s} {len(task.split(s))}" for s in sizes)
    )


def summary_lines(main: dict, budget: float) -> list[str]:
    """The main row's measured figures in words: accuracy against the full model, disagreement
    against the budget, layer savings against the oracle, the runtime's own answers, wall clock."""
    m = main["metrics"]
    drop = m["full_accuracy"] - m["adainfer_accuracy"]
    lines = [
        f"accuracy: AdaInfer {m['adainfer_accuracy']:.3f} vs full {m['full_accuracy']:.3f} ({-drop * 100:+.1f} points)",
        f"disagreement with the full model on test: {1 - m['agreement']:.3f} "
        f"(budget {budget:.3f}, threshold chosen on held-out)",
    ]
    if m["savings_vs_oracle"] is not None:
        lines.append(
            f"layer savings: pruning ratio {m['pruning_ratio']:.3f} = {m['savings_vs_oracle']:.0%} of the oracle's "
            f"{m['oracle_pruning_ratio']:.3f}"
        )
    if m.get("runtime_accuracy") is not None:
        lines.append(
            f"through the runtime (the patched model's own answers, {m['runtime_prompts']} prompts): accuracy "
            f"{m['runtime_accuracy']:.3f} (simulated {m['adainfer_accuracy']:.3f}), agreement with the full model "
            f"{m['runtime_agreement']:.3f}, answers equal to the simulation's on "
            f"{m['runtime_matches_simulation']:.1%}, exits on {m['runtime_exit_match']:.1%}, "
            f"pruning ratio {m['runtime_pruning_ratio']:.3f}"
        )
    if m["speedup"] is None:
        lines.append(f"wall clock: {NOT_MEASURED} (--wallclock-prompts 0)")
    else:
        lines.append(
            f"wall clock: {m['speedup']:.2f}x vs ideal {m['ideal_speedup']:.2f}x "
            f"({m['speedup_vs_ideal']:.0%} of ideal), {m['wallclock_prompts']} prompts"
        )
    return lines


def model_line(loaded) -> str:
    """One line about a loaded model (``adainfer.app.loading.LoadedModel``): class, size, attention."""
    model = loaded.model
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{type(model).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters, attention {cfg._attn_implementation}, "
        f"{str(next(model.parameters()).dtype).removeprefix('torch.')}"
    )


def task_info(spec: str, settings: RunSettings) -> dict:
    """The task settings a classifier was calibrated with (``eval`` rebuilds the same splits)."""
    return {
        "task": spec,
        "k_shot": settings.k_shot,
        "template": settings.template,
        "seed": settings.seed,
        "sizes": dict(settings.sizes),
        "label_words": list(settings.label_words) if settings.label_words else None,
        "min_confidence": settings.min_confidence,
    }


def write_outputs(
    out_dir: Path,
    rows: list[dict],
    feats: dict[str, LayerFeatures],
    settings: RunSettings,
    extra: dict,
    plots: bool = True,
) -> dict:
    """results.json, classifier.json (the main row's) and the PNGs. Returns the JSON payload."""
    out_dir.mkdir(parents=True, exist_ok=True)
    test = feats["test"]
    main = next((r for r in rows if r["variant"]["main"]), rows[0])
    main_clf: StopClassifier = main["classifier"]
    has_gold = bool((test.labels >= 0).all())
    bias = None if main_clf.label_bias is None else np.asarray(main_clf.label_bias)
    layers = per_layer_table(test, bias)
    label_rows = [r for r in rows if r["variant"]["vocab_mode"] == "labels"]
    sweeps = {r["variant"]["name"]: threshold_sweep(test, r["classifier"]) for r in label_rows}
    # the plot compares like with like: rows with the main row's correction (raw rows are in the table)
    plotted = [r for r in label_rows if r["classifier"].label_bias_estimator == main_clf.label_bias_estimator]
    payload = {
        "settings": asdict(settings),
        **extra,
        "table": {
            "columns": [h for h, _ in TABLE_COLUMNS],
            "rows": table_rows(rows),
        },
        "rows": [
            {"variant": r["variant"], "metrics": r["metrics"], "classifier": r["classifier"].to_dict()} for r in rows
        ],
        "per_layer": layers,
        "threshold_sweeps": sweeps,
        "environment": _environment(),
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    main_clf.save(out_dir / "classifier.json")
    if plots and has_gold:
        from adainfer.app import plots as P

        sim = simulate(test, main_clf)
        m = main["metrics"]
        name = main["variant"]["name"]
        P.exit_histogram(
            sim["exit_layers"],
            sim["oracle_exit_layers"],
            main_clf.n_layers,
            out_dir / "exit_layers.png",
            title=f"exit layers on the test split ({name}, budget {settings.budget:.1%})",
        )
        P.tradeoff(
            {r["variant"]["name"]: sweeps[r["variant"]["name"]] for r in plotted},
            {r["variant"]["name"]: r["metrics"] for r in plotted},
            m["full_accuracy"],
            m["oracle_pruning_ratio"],
            out_dir / "accuracy_vs_savings.png",
            budget_points=(extra.get("budget_sweep") or {}).get(name),
            title=f"test split: accuracy vs layers saved (dots: {settings.budget:.1%} budget)",
        )
        P.per_layer(layers, out_dir / "per_layer.png")
    return payload


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _environment() -> dict:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
