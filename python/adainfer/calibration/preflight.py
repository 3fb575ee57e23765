"""The pre-flight answer of ``adainfer calibrate``: is early exit worth it for this model and task?

From a calibrated classifier's held-out figures and a cost model of one forward pass measured on
the user's machine at the user's batch size:

- the oracle's savings: the fraction of layers a perfect stop rule would skip on the held-out rows
  (each row stops at the earliest layer from which the readout's answer stays the full model's);
- the certified savings: the fraction the calibrated rule skips there (its threshold certified on
  those rows);
- the predicted wall clock. With rows leaving the batch as they exit, layer l runs on the A_l rows
  still active; a forward of r rows costs ``fixed + per_row * r`` (both measured, spread evenly
  over the L layers), so with s = mean exit layer / L

      speedup = (fixed + per_row * B) / (fixed + per_row * B * s)

  The exit checks themselves are not in the model (over a task's K label tokens they cost a few
  K x d dot products per row); ``adainfer eval --wallclock-prompts`` measures the real ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

# Below these the report says plainly that early exit will not pay.
MIN_SAVED = 0.10
MIN_SPEEDUP = 1.10


@dataclass(frozen=True)
class ForwardCost:
    """A forward pass of r rows costs ``fixed_s + per_row_s * r`` seconds (measured)."""

    fixed_s: float
    per_row_s: float
    batch_size: int

    def seconds(self, rows: float) -> float:
        return self.fixed_s + self.per_row_s * rows


@dataclass(frozen=True)
class Preflight:
    """What early exit would give on this task (fractions of the model's layers)."""

    n_layers: int
    n_heldout: int
    oracle_saved: float
    certified_saved: float
    speedup: float | None
    cost: ForwardCost | None

    @property
    def worth_it(self) -> bool:
        return self.certified_saved >= MIN_SAVED and (self.speedup is None or self.speedup >= MIN_SPEEDUP)

    def verdict(self) -> str:
        if self.certified_saved <= 0.0:
            return "early exit will not pay here: no threshold fits the budget, every row runs the full model"
        if self.certified_saved < MIN_SAVED:
            return (
                f"early exit will not pay here: the certified rule skips only {self.certified_saved:.1%} of the "
                f"layers (a perfect rule would skip {self.oracle_saved:.1%}); more held-out examples or a larger "
                "budget would let it spend more"
            )
        if self.speedup is not None and self.speedup < MIN_SPEEDUP:
            return (
                f"early exit will not pay at batch {self.cost.batch_size}: the layers it skips are "
                f"{self.certified_saved:.1%} of the work that scales with rows, but the predicted wall clock is "
                f"{self.speedup:.2f}x"
            )
        return "worth it"

    def lines(self) -> list[str]:
        out = [
            f"pre-flight (held-out split, {self.n_heldout} examples):",
            f"  a perfect stop rule would skip {self.oracle_saved:.1%} of the layers",
            f"  the certified rule skips {self.certified_saved:.1%}",
        ]
        if self.speedup is not None:
            c = self.cost
            out.append(
                f"  predicted wall clock at batch {c.batch_size}: {self.speedup:.2f}x the full model "
                f"(a forward here: {c.fixed_s * 1e3:.0f} ms + {c.per_row_s * 1e3:.1f} ms per row, measured)"
            )
        out.append(f"  verdict: {self.verdict()}")
        return out

    def to_dict(self) -> dict:
        return {
            "n_heldout": self.n_heldout,
            "oracle_saved": self.oracle_saved,
            "certified_saved": self.certified_saved,
            "predicted_speedup": self.speedup,
            "forward_fixed_s": None if self.cost is None else self.cost.fixed_s,
            "forward_per_row_s": None if self.cost is None else self.cost.per_row_s,
            "batch_size": None if self.cost is None else self.cost.batch_size,
            "worth_it": self.worth_it,
            "verdict": self.verdict(),
        }


def predicted_speedup(cost: ForwardCost, mean_exit_fraction: float) -> float:
    """(fixed + per_row * B) / (fixed + per_row * B * s): rows leave the batch as they exit."""
    if not 0.0 <= mean_exit_fraction <= 1.0:
        raise ValueError(f"the mean exit fraction is a fraction of the layers, got {mean_exit_fraction}")
    b = cost.batch_size
    return cost.seconds(b) / (cost.fixed_s + cost.per_row_s * b * mean_exit_fraction)


def preflight(classifier, cost: ForwardCost | None = None) -> Preflight:
    """The report of a classifier calibrated by :func:`adainfer.calibration.fit.calibrate` (its
    held-out figures in ``info``), with the wall clock predicted from ``cost`` when given."""
    info = classifier.info
    missing = [k for k in ("heldout_mean_exit_layer", "heldout_oracle_mean_exit_layer", "heldout_n") if k not in info]
    if missing:
        raise ValueError(f"the classifier has no held-out figures ({', '.join(missing)}): calibrate it first")
    n_layers = classifier.n_layers
    mean_exit = float(info["heldout_mean_exit_layer"])
    return Preflight(
        n_layers=n_layers,
        n_heldout=int(info["heldout_n"]),
        oracle_saved=1.0 - float(info["heldout_oracle_mean_exit_layer"]) / n_layers,
        certified_saved=1.0 - mean_exit / n_layers,
        speedup=None if cost is None else predicted_speedup(cost, mean_exit / n_layers),
        cost=cost,
    )
