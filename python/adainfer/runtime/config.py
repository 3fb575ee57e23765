"""AdaInferConfig: where the exit checks run and how finished rows are handled."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("compact", "mask")
DEFAULT_HISTORY = 1024
# Decode steps (one new position per row): how many rows must have finished before a layer for
# that layer to run compacted, by device type. Below it the finished rows stay in the batch, frozen
# (their K/V then come from the layer itself: the same state propagation). A decode layer streams
# all its weights whatever the row count until the batch reaches the device's compute/bandwidth
# ridge, so dropping a few rows saves nothing there, while compacting costs a K/V fill and a
# gather of the active rows' history. CPU: measured on this project's machine (bench_generate.py);
# CUDA: a bf16 decode layer stays bandwidth-bound to ~100+ rows (not measured here: no GPU).
DECODE_COMPACT_ROWS = {"cpu": 8, "cuda": 64}


def _integer(name: str, value) -> int:
    """``value`` as an int when it is an integer (int, numpy or 0-d torch integer; not bool or float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None


@dataclass(frozen=True)
class AdaInferConfig:
    """Which layers are checked and what happens to finished rows.

    Layers are counted from 1: "layer k" is the hidden state after k decoder layers, and k = L (the
    number of decoder layers) is the model's own output, which is never checked (every row that is
    still active there simply finishes).

    Attributes:
        min_layer: first layer checked (when ``layers`` is None).
        interval: check every ``interval``-th layer from ``min_layer`` on (when ``layers`` is None).
        layers: explicit layers to check (overrides ``min_layer`` / ``interval``); integers, stored
            as a sorted tuple.
        mode: ``"compact"`` (finished rows leave the batch; the remaining layers run on fewer rows)
            or ``"mask"`` (finished rows stay in the batch with their hidden state frozen: what other
            systems do, kept as the baseline that shows what compaction saves).
        enabled: False turns every check off: the patched model then runs exactly the original code.
        correct_full_depth: also apply the classifier's label-bias correction to the answer of rows
            that run every layer (what ``adainfer eval`` scores; the model's own answer is biased on
            some tasks). Off by default: rows that never exit return the unpatched model's logits
            bit for bit. On, such rows' last-position logits become the corrected label
            log-probabilities, like an exited row's (see ``AdaInferHandle``).
        history: how many forward calls' ``ExitStats`` the handle keeps (``handle.history``, oldest
            dropped first; in ``generate`` one per step), so a long-running process does not grow.
        decode_compact_rows: compact mode, decode steps (one new position per row): a layer runs
            compacted only when at least this many rows finished before it (or every row did);
            otherwise the finished rows run it frozen, as in mask mode, which is cheaper while a
            layer's cost does not depend on its row count. 1 always compacts; None takes the
            device's default (``DECODE_COMPACT_ROWS``). Prefill (several positions) always compacts.
            Either way the results are the same computation (compact == mask).
    """

    min_layer: int = 1
    interval: int = 1
    layers: Sequence[int] | None = None
    mode: str = "compact"
    enabled: bool = True
    correct_full_depth: bool = False
    history: int = DEFAULT_HISTORY
    decode_compact_rows: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not valid (use one of: {', '.join(MODES)})")
        if not isinstance(self.enabled, bool):
            raise TypeError(f"enabled must be True or False, got {self.enabled!r}")
        min_layer = _integer("min_layer", self.min_layer)
        if min_layer < 1:
            raise ValueError(f"min_layer must be >= 1 (layers are counted from 1), got {min_layer}")
        interval = _integer("interval", self.interval)
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        history = _integer("history", self.history)
        if history < 1:
            raise ValueError(f"history must be >= 1 (the number of ExitStats the handle keeps), got {history}")
        object.__setattr__(self, "min_layer", min_layer)
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "history", history)
        if self.decode_compact_rows is not None:
            rows = _integer("decode_compact_rows", self.decode_compact_rows)
            if rows < 1:
                raise ValueError(f"decode_compact_rows must be >= 1 (1 always compacts), got {rows}")
            object.__setattr__(self, "decode_compact_rows", rows)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)):
                raise TypeError(f"layers must be a sequence of integers, got {self.layers!r}")
            # a tuple, once: a generator would be empty the second time it is read
            layers = tuple(sorted({_integer("checked layers", k) for k in self.layers}))
            bad = [k for k in layers if k < 1]
            if bad:
                raise ValueError(f"checked layers are counted from 1; got {bad}")
            if not layers:
                raise ValueError("layers=[] checks no layer: give at least one, or use enabled=False to turn exits off")
            object.__setattr__(self, "layers", layers)

    def compact_rows_for(self, device) -> int:
        """Finished rows needed before a decode layer runs compacted, on ``device``."""
        if self.decode_compact_rows is not None:
            return self.decode_compact_rows
        return DECODE_COMPACT_ROWS.get(getattr(device, "type", str(device)), 1)

    def checked_layers(self, num_layers: int) -> frozenset[int]:
        """The layers k (1 <= k < num_layers) after which rows are checked.

        Raises:
            ValueError: a layer in ``layers`` is not below ``num_layers``, or ``min_layer`` leaves no
                layer to check on a model of ``num_layers`` layers.
        """
        if self.layers is not None:
            too_deep = [k for k in self.layers if k >= num_layers]
            if too_deep:
                raise ValueError(
                    f"checked layers {too_deep} are not below the model's {num_layers} layers "
                    f"(the last layer is the model's own output and is never checked)"
                )
            return frozenset(self.layers)
        if num_layers < 2:
            raise ValueError(
                f"a {num_layers}-layer model has no layer to check (layer {num_layers} is the model's own output): "
                "use enabled=False"
            )
        if self.min_layer >= num_layers:
            raise ValueError(
                f"min_layer {self.min_layer} checks no layer of a {num_layers}-layer model (layers 1..{num_layers - 1} "
                f"can be checked; layer {num_layers} is the model's own output): use min_layer < {num_layers}, "
                "or enabled=False to turn exits off"
            )
        return frozenset(range(self.min_layer, num_layers, self.interval))
