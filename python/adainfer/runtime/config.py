"""AdaInferConfig: where the exit checks run and how finished rows are handled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("compact", "mask")


@dataclass(frozen=True)
class AdaInferConfig:
    """Which layers are checked and what happens to finished rows.

    Layers are counted from 1: "layer k" is the hidden state after k decoder layers, and k = L (the
    number of decoder layers) is the model's own output, which is never checked (every row that is
    still active there simply finishes).

    Attributes:
        min_layer: first layer checked (when ``layers`` is None).
        interval: check every ``interval``-th layer from ``min_layer`` on (when ``layers`` is None).
        layers: explicit layers to check (overrides ``min_layer`` / ``interval``).
        mode: ``"compact"`` (finished rows leave the batch; the remaining layers run on fewer rows)
            or ``"mask"`` (finished rows stay in the batch with their hidden state frozen: what other
            systems do, kept as the baseline that shows what compaction saves).
        enabled: False turns every check off: the patched model then runs exactly the original code.
        correct_full_depth: also apply the classifier's label-bias correction to the answer of rows
            that run every layer (what ``adainfer eval`` scores; the model's own answer is biased on
            some tasks). Off by default: rows that never exit return the unpatched model's logits
            bit for bit. On, such rows' last-position logits become the corrected label
            log-probabilities, like an exited row's (see ``AdaInferHandle``).
    """

    min_layer: int = 1
    interval: int = 1
    layers: Sequence[int] | None = None
    mode: str = "compact"
    enabled: bool = True
    correct_full_depth: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not valid (use one of: {', '.join(MODES)})")
        if self.min_layer < 1:
            raise ValueError(f"min_layer must be >= 1 (layers are counted from 1), got {self.min_layer}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.layers is not None:
            bad = [k for k in self.layers if int(k) < 1]
            if bad:
                raise ValueError(f"checked layers are counted from 1; got {bad}")

    def checked_layers(self, num_layers: int) -> frozenset[int]:
        """The layers k (1 <= k < num_layers) after which rows are checked."""
        if self.layers is not None:
            too_deep = [k for k in self.layers if int(k) >= num_layers]
            if too_deep:
                raise ValueError(
                    f"checked layers {too_deep} are not below the model's {num_layers} layers "
                    f"(the last layer is the model's own output and is never checked)"
                )
            return frozenset(int(k) for k in self.layers)
        return frozenset(range(self.min_layer, num_layers, self.interval))
