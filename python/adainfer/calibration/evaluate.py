"""Evaluating a stop classifier on a task split, from its per-layer features, side by side.

Everything except the wall clock is computed exactly from the collected per-layer features: the
early-exit run is simulated (a row stops at the first checked layer whose score is > 0, else at
layer L) and compared with the full model on the same rows.

Metrics (one dict, keys in ``METRIC_KEYS``):
    full_accuracy          the full model's answer (with the classifier's label bias at layer L)
    adainfer_accuracy      the answer at each row's exit layer
    agreement              fraction of rows whose exit answer equals the full model's
    mean_exit_layer        mean layers run (1..L)
    pruning_ratio          the paper's metric, 1 - mean_exit_layer / L
    oracle_mean_exit_layer / oracle_pruning_ratio   exiting at the earliest layer from which the
                           answer equals the final one and stays so (unreachable by any rule)
    savings_vs_oracle      pruning_ratio / oracle_pruning_ratio
    checks_per_row         exit checks run per row (checked layers up to the exit layer)
    flops_saved            1 - FLOPs(AdaInfer) / FLOPs(full), counting every check's own cost
    runtime_*              measured through the real runtime by a ``RuntimeFn`` when one is given:
                           the patched model's own answers on every prompt of the split.
                           runtime_accuracy, runtime_agreement (with the full model's answer),
                           runtime_matches_simulation (answer equal to the simulated exit answer),
                           runtime_exit_match (exit layer equal to the simulated one),
                           runtime_pruning_ratio
    wallclock_*            measured by a ``WallclockFn`` when one is given, else None
                           ("not measured"; never estimated); ``ideal_speedup`` is then
                           L / (mean layers the runtime ran on the timed prompts), and
                           ``runtime_exit_match`` the share of timed prompts that stopped where
                           the simulation from the features says

The wall clock needs the early-exit runtime, which this wing does not import: it plugs in through
``WallclockFn`` (``adainfer.runtime.wallclock`` implements it).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from adainfer.calibration.classifier import StopClassifier
from adainfer.calibration.features import LayerFeatures, label_margin
from adainfer.calibration.fit import gold_answer, layer_signals
from adainfer.calibration.metrics import (
    check_flops,
    head_flops,
    layer_flops,
    oracle_exit_layers,
    pruning_ratio,
    simulate_exits,
    take_at_exit,
)

METRIC_KEYS = (
    "n",
    "full_accuracy",
    "adainfer_accuracy",
    "agreement",
    "mean_exit_layer",
    "pruning_ratio",
    "oracle_mean_exit_layer",
    "oracle_pruning_ratio",
    "savings_vs_oracle",
    "checks_per_row",
    "flops_saved",
    "wallclock_full_s",
    "wallclock_adainfer_s",
    "speedup",
    "ideal_speedup",
    "speedup_vs_ideal",
    "runtime_exit_match",
    "wallclock_prompts",
    "runtime_accuracy",
    "runtime_agreement",
    "runtime_matches_simulation",
    "runtime_pruning_ratio",
    "runtime_prompts",
)


class RuntimeFn(Protocol):
    """The real runtime's answers: ``run(model, tokenizer, prompts, classifier, batch_size) -> dict``
    with ``answers`` (N,) in the classifier's answer space (label index in label mode, token id in
    full mode; full-depth answers carrying the classifier's label bias, as the simulation's) and
    ``exit_layers`` (N,), one per prompt, in order."""

    def __call__(
        self, model: Any, tokenizer: Any, prompts: list[str], classifier: StopClassifier, batch_size: int
    ) -> dict: ...


class WallclockFn(Protocol):
    """Measures the real early-exit runtime against the unpatched model on the same prompts.

    ``measure(model, tokenizer, prompts, classifier, batch_size) -> dict`` with
        full_s:       seconds for the unpatched model over ``prompts`` (batches of ``batch_size``),
        adainfer_s:   seconds for the patched model with ``classifier``'s exits,
        exit_layers:  exit layer of each timed prompt in the patched run (1..L),
        rows:         (optional) indices of the timed prompts when not all were timed,
    both timed the same way (warm-up excluded, device synchronised).
    """

    def __call__(
        self, model: Any, tokenizer: Any, prompts: list[str], classifier: StopClassifier, batch_size: int
    ) -> dict: ...


def flops_config(features: LayerFeatures) -> SimpleNamespace:
    """The architecture numbers the FLOPs count needs, from the features' metadata."""
    cfg = features.meta.get("config")
    if cfg is None:
        raise ValueError("these features carry no model config (collected by an older version?)")
    return SimpleNamespace(**cfg)


def answers(features: LayerFeatures, clf: StopClassifier) -> tuple[np.ndarray, np.ndarray]:
    """((N, L) scores with the threshold folded in, (N, L) answers) as the runtime would see them."""
    bias = None if clf.label_bias is None else np.asarray(clf.label_bias)
    top, gap, answer = layer_signals(features, clf.vocab_mode, bias, probe=clf.probe)
    layers = np.arange(1, features.n_layers + 1)[None, :]
    if clf.threshold is None:  # never stops early
        return np.full(top.shape, -1.0), answer
    return clf.decision(top, gap, layers) - clf.threshold, answer


def _checked_mask(clf: StopClassifier) -> np.ndarray:
    mask = np.zeros(clf.n_layers, dtype=bool)
    for k in clf.checked_layers:
        mask[k - 1] = True
    return mask


def _flops(features: LayerFeatures, clf: StopClassifier, exits: np.ndarray) -> tuple[float, np.ndarray]:
    """(FLOPs saved, checks per row): layers run at the prompt length, plus checks, plus the head."""
    cfg = flops_config(features)
    per_layer = layer_flops(cfg, features.prompt_lengths)  # (N,)
    n_cand = features.n_labels if clf.vocab_mode == "labels" else int(cfg.vocab_size)
    checked = _checked_mask(clf)
    # checks run at checked layers k <= exit (the check at the exit layer is what stopped the row)
    cum_checks = np.cumsum(checked)
    checks = cum_checks[np.minimum(exits, clf.n_layers) - 1]
    full = per_layer * clf.n_layers + head_flops(cfg)
    ada = per_layer * exits + checks * check_flops(cfg, n_cand) + head_flops(cfg)
    return float(1.0 - ada.sum() / full.sum()), checks


def simulate(features: LayerFeatures, clf: StopClassifier) -> dict[str, np.ndarray]:
    """Per-row results of the simulated early-exit run: exits, answers, oracle exits."""
    clf_layers = clf.n_layers
    if features.n_layers != clf_layers:
        raise ValueError(f"features have {features.n_layers} layers; the classifier's model has {clf_layers}")
    scores, answer = answers(features, clf)
    exits = simulate_exits(scores, _checked_mask(clf))
    return {
        "exit_layers": exits,
        "exit_answer": take_at_exit(answer, exits),
        "full_answer": answer[:, -1],
        "oracle_exit_layers": oracle_exit_layers(answer),
        "scores": scores,
        "answers": answer,
    }


def evaluate(
    features: LayerFeatures,
    clf: StopClassifier,
    *,
    measure_wallclock: WallclockFn | Callable[..., dict] | None = None,
    measure_runtime: RuntimeFn | Callable[..., dict] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompts: list[str] | None = None,
    batch_size: int = 32,
) -> dict:
    """All metrics of ``clf`` on ``features`` (see the module docstring).

    Args:
        features: per-layer features of the evaluated split.
        clf: the stop classifier (its label bias applies to the full model's answer too).
        measure_wallclock: optional ``WallclockFn``; with it, ``model``, ``tokenizer`` and the split's
            ``prompts`` (in the features' row order) are required.
        measure_runtime: optional ``RuntimeFn`` (the same arguments are required): answers and
            exits of the real runtime on every prompt, scored beside the simulation.
        batch_size: the wall-clock batch size.
    """
    sim = simulate(features, clf)
    exits, n_layers = sim["exit_layers"], clf.n_layers
    gold = gold_answer(features, clf.vocab_mode) if (features.labels >= 0).all() else None
    oracle = sim["oracle_exit_layers"]
    flops_saved, checks = _flops(features, clf, exits)
    ratio = pruning_ratio(exits, n_layers)
    oracle_ratio = pruning_ratio(oracle, n_layers)
    out = {
        "n": int(features.n_examples),
        "full_accuracy": None if gold is None else float(np.mean(sim["full_answer"] == gold)),
        "adainfer_accuracy": None if gold is None else float(np.mean(sim["exit_answer"] == gold)),
        "agreement": float(np.mean(sim["exit_answer"] == sim["full_answer"])),
        "mean_exit_layer": float(np.mean(exits)),
        "pruning_ratio": ratio,
        "oracle_mean_exit_layer": float(np.mean(oracle)),
        "oracle_pruning_ratio": oracle_ratio,
        "savings_vs_oracle": float(ratio / oracle_ratio) if oracle_ratio > 0 else None,
        "checks_per_row": float(np.mean(checks)),
        "flops_saved": flops_saved,
        "wallclock_full_s": None,
        "wallclock_adainfer_s": None,
        "speedup": None,
        "ideal_speedup": float(1.0 / (1.0 - ratio)),
        "speedup_vs_ideal": None,
        "runtime_exit_match": None,
        "wallclock_prompts": None,
        **dict.fromkeys(("runtime_accuracy", "runtime_agreement", "runtime_matches_simulation")),
        "runtime_pruning_ratio": None,
        "runtime_prompts": None,
    }
    if measure_wallclock is not None or measure_runtime is not None:
        if model is None or tokenizer is None or prompts is None:
            raise ValueError("measuring the runtime or the wall clock needs model, tokenizer and prompts")
        if len(prompts) != features.n_examples:
            raise ValueError(f"{len(prompts)} prompts for {features.n_examples} feature rows")
    if measure_runtime is not None:
        run = measure_runtime(model, tokenizer, list(prompts), clf, batch_size)
        run_answer, run_exits = np.asarray(run["answers"]), np.asarray(run["exit_layers"])
        if run_answer.shape != (features.n_examples,) or run_exits.shape != (features.n_examples,):
            raise ValueError("the runtime must answer every prompt once")
        out["runtime_accuracy"] = None if gold is None else float(np.mean(run_answer == gold))
        out["runtime_agreement"] = float(np.mean(run_answer == sim["full_answer"]))
        out["runtime_matches_simulation"] = float(np.mean(run_answer == sim["exit_answer"]))
        out["runtime_exit_match"] = float(np.mean(run_exits == exits))
        out["runtime_pruning_ratio"] = pruning_ratio(run_exits, n_layers)
        out["runtime_prompts"] = int(features.n_examples)
    if measure_wallclock is not None:
        wc = measure_wallclock(model, tokenizer, list(prompts), clf, batch_size)
        full_s, ada_s = float(wc["full_s"]), float(wc["adainfer_s"])
        out["wallclock_full_s"], out["wallclock_adainfer_s"] = full_s, ada_s
        out["speedup"] = full_s / ada_s
        if wc.get("exit_layers") is not None:
            # how often the real runtime stopped where the simulation says (numerics near the threshold);
            # ``rows`` names the prompts that were timed when not all of them were
            run_exits = np.asarray(wc["exit_layers"])
            rows = np.asarray(wc["rows"]) if wc.get("rows") is not None else np.arange(len(exits))
            if out["runtime_exit_match"] is None:  # the runtime pass over every prompt says it better
                out["runtime_exit_match"] = float(np.mean(run_exits == exits[rows]))
            out["wallclock_prompts"] = len(rows)
            # The ideal for the timed prompts, from the layers the runtime really ran on them.
            out["ideal_speedup"] = float(n_layers / np.mean(run_exits))
        out["speedup_vs_ideal"] = out["speedup"] / out["ideal_speedup"]
    return out


def threshold_sweep(features: LayerFeatures, clf: StopClassifier, n_points: int = 60) -> list[dict]:
    """Accuracy vs savings over thresholds (the classifier's first checked layer kept).

    Thresholds are quantiles of the decision values at the checked layers, plus "never". Each point:
    threshold, pruning_ratio, flops_saved, adainfer_accuracy, agreement.
    """
    bias = None if clf.label_bias is None else np.asarray(clf.label_bias)
    top, gap, _ = layer_signals(features, clf.vocab_mode, bias)
    layers = np.arange(1, features.n_layers + 1)[None, :]
    decision = clf.decision(top, gap, layers)
    min_layer = clf.min_layer if clf.threshold is not None else 1
    base = clf.with_threshold(None, min_layer=min_layer)
    values = decision[:, min_layer - 1 : clf.n_layers - 1]
    values = values[np.isfinite(values)]
    thresholds: list[float | None] = [None]
    if values.size:
        qs = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_points)))
        thresholds += [float(q) for q in qs[::-1]] + [float(values.min()) - 1.0]
    points = []
    for t in thresholds:
        m = evaluate(features, base.with_threshold(t, min_layer=min_layer))
        points.append(
            {
                "threshold": t,
                "pruning_ratio": m["pruning_ratio"],
                "flops_saved": m["flops_saved"],
                "adainfer_accuracy": m["adainfer_accuracy"],
                "agreement": m["agreement"],
            }
        )
    return points


def per_layer_table(features: LayerFeatures, bias: np.ndarray | None) -> list[dict]:
    """Per layer k: answer accuracy raw and with ``bias``, agreement with the final answer, and
    (two labels) the AUC of the label margin against the gold label."""
    from sklearn.metrics import roc_auc_score

    _, _, raw = layer_signals(features, "labels", None)
    _, _, cor = layer_signals(features, "labels", bias)
    has_gold = (features.labels >= 0).all() and len(np.unique(features.labels)) > 1
    margin = label_margin(features) if features.n_labels == 2 else None
    rows = []
    for j in range(features.n_layers):
        row = {
            "layer": j + 1,
            "agreement_with_final": float(np.mean(cor[:, j] == cor[:, -1])),
            "accuracy_raw": float(np.mean(raw[:, j] == features.labels)) if has_gold else None,
            "accuracy_corrected": float(np.mean(cor[:, j] == features.labels)) if has_gold else None,
            "margin_auc": float(roc_auc_score(features.labels, margin[:, j]))
            if has_gold and margin is not None
            else None,
        }
        rows.append(row)
    return rows
