"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

* ``exit_histogram``: how many rows stop after each layer, AdaInfer vs the oracle.
* ``tradeoff``: accuracy vs layer pruning ratio over thresholds (one curve per classifier), the
  chosen thresholds, the full model's accuracy and the oracle's pruning ratio.
* ``per_layer``: per-layer accuracy of the label answer (raw and corrected), agreement with the
  final answer, and the AUC of the label margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def exit_histogram(exits: np.ndarray, oracle: np.ndarray, n_layers: int, path: str | Path, title: str = "") -> Path:
    """Bar chart of exit layers (1..L) of AdaInfer next to the oracle's."""
    plt = _plt()
    layers = np.arange(1, n_layers + 1)
    a = np.bincount(np.asarray(exits), minlength=n_layers + 1)[1:]
    o = np.bincount(np.asarray(oracle), minlength=n_layers + 1)[1:]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(layers - 0.2, a, width=0.4, label=f"AdaInfer (mean {np.mean(exits):.1f})", color="tab:blue")
    ax.bar(layers + 0.2, o, width=0.4, label=f"oracle (mean {np.mean(oracle):.1f})", color="tab:gray", alpha=0.7)
    ax.set_xlabel("exit layer (layers run)")
    ax.set_ylabel("examples")
    ax.set_xlim(0.3, n_layers + 0.7)
    ax.set_title(title or "exit layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def tradeoff(
    sweeps: dict[str, list[dict]],
    chosen: dict[str, dict],
    full_accuracy: float,
    oracle_ratio: float,
    path: str | Path,
    budget_points: list[dict] | None = None,
    title: str = "",
) -> Path:
    """Accuracy vs layer pruning ratio over thresholds.

    Args:
        sweeps: name -> points from :func:`adainfer.evaluate.threshold_sweep`.
        chosen: name -> metrics at the budgeted threshold (``pruning_ratio``, ``adainfer_accuracy``).
        full_accuracy: the full model's accuracy (with the same label bias as the curves).
        oracle_ratio: the oracle's pruning ratio (it keeps the full model's answers).
        budget_points: optional points of :func:`adainfer.pipeline.budget_sweep` (threshold chosen
            on held-out per budget, measured on test): what a user gets for each budget.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, points) in enumerate(sweeps.items()):
        c = colors[i % len(colors)]
        x = [p["pruning_ratio"] for p in points]
        y = [p["adainfer_accuracy"] for p in points]
        ax.plot(x, y, "-", color=c, label=name, lw=1.5)
        if name in chosen:
            ax.plot(chosen[name]["pruning_ratio"], chosen[name]["adainfer_accuracy"], "o", color=c, ms=8, mec="k")
    if budget_points:
        x = [p["pruning_ratio"] for p in budget_points]
        y = [p["adainfer_accuracy"] for p in budget_points]
        ax.plot(x, y, "s--", color="k", ms=4, lw=1, label="held-out budget 0-50% (main row)")
    ax.axhline(full_accuracy, color="k", ls=":", lw=1, label=f"full model, corrected ({full_accuracy:.3f})")
    ax.axvline(oracle_ratio, color="tab:gray", ls="--", lw=1)
    ax.plot([oracle_ratio], [full_accuracy], "*", color="gold", mec="k", ms=14, label=f"oracle ({oracle_ratio:.3f})")
    ax.set_xlabel("layer pruning ratio (1 - mean layers run / L)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(-0.01, max(0.5, oracle_ratio + 0.05))
    ax.set_ylim(max(0.0, full_accuracy - 0.2), min(1.0, full_accuracy + 0.05))
    ax.set_title(title or "accuracy vs layers saved (dots: budgeted threshold)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def per_layer(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Per-layer accuracy (raw / corrected), agreement with the final answer, margin AUC."""
    plt = _plt()
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    series = [
        ("accuracy_raw", "accuracy, raw", "tab:red", "-"),
        ("accuracy_corrected", "accuracy, label bias corrected", "tab:blue", "-"),
        ("agreement_with_final", "agreement with the final answer", "tab:green", "--"),
        ("margin_auc", "label margin AUC", "tab:purple", ":"),
    ]
    for key, label, color, style in series:
        if all(r.get(key) is not None for r in rows):
            ax.plot(layers, [r[key] for r in rows], style, color=color, label=label, marker=".")
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylim(0.2, 1.02)
    ax.set_title(title or "per-layer logit lens on the label tokens")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
