"""Row bookkeeping of a compact pass: the rows that finished, and views of the batch on a subset of rows.

A compact pass runs each layer on the rows still active. ``FinishedRows`` keeps the rows that
exited (original ids and frozen hidden states); ``RowView`` restricts the decoder's batch-leading
arguments to a subset of rows, once per tensor and exit event; ``RowSubsetCache`` lets a layer
that runs on the active rows grow the model's cache for all B rows, the finished rows' K/V filled
in from their frozen states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adainfer.runtime.placement import to_device
from adainfer_kernels.compaction import merge_rows


@dataclass
class FinishedRows:
    """Rows that exited during this pass: original ids and frozen hidden states."""

    rows: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        self.rows.append(rows)
        self.hidden.append(hidden)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (F,), hidden (F, T, d)), concatenated over exit events (once per event)."""
        if len(self.rows) > 1:
            device = self.hidden[0].device  # rows may have exited on layers of different devices
            self.rows = [torch.cat([to_device(r, device) for r in self.rows])]
            self.hidden = [torch.cat([to_device(h, device) for h in self.hidden])]
        return self.rows[0], self.hidden[0]


class RowSubsetCache:
    """The model's cache, seen by a layer that runs on a subset of the batch's rows.

    ``update`` receives K/V of the active rows only; it adds the state-propagated K/V of rows that
    already finished (so the real cache grows for all B rows, in batch order) and returns the
    active rows' full history for attention. Everything else is delegated to the real cache.
    """

    def __init__(self, cache, active_rows: torch.Tensor, batch_size: int, fill) -> None:
        self._cache = cache
        self._active_rows = active_rows
        self._batch_size = batch_size
        self._fill = fill  # (layer_idx, device) -> (rows, K, V) of the finished rows, on that device

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        device = key_states.device
        rows, k_fill, v_fill = self._fill(layer_idx, device)
        active = self._active_rows if self._active_rows.device == device else self._active_rows.to(device)
        keys = merge_rows(key_states, active, k_fill, rows, self._batch_size)
        values = merge_rows(value_states, active, v_fill, rows, self._batch_size)
        keys, values = self._cache.update(keys, values, layer_idx, *args, **kwargs)
        return keys.index_select(0, active), values.index_select(0, active)

    def __getattr__(self, name):
        return getattr(self._cache, name)


class RowView:
    """Rows of the decoder's batch-leading tensors, taken once per tensor and exit event.

    The decoder passes every layer the same full-batch tensors (or, for models with several
    attention kinds, one of a few): keyed by identity, each is indexed once until the rows change.
    Broadcasts (dim 0 == 1 while the batch is larger) pass through unchanged, or are expanded
    when ``expand``.
    """

    def __init__(self, batch: int, expand: bool) -> None:
        self.batch = batch
        self.expand = expand
        self.rows: torch.Tensor | None = None
        self._taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self._taken.clear()

    def __call__(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.shape[0] != self.batch:
            return t.expand(self.rows.numel(), *t.shape[1:]) if self.expand else t
        hit = self._taken.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, t.index_select(0, to_device(self.rows, t.device)))
            self._taken[id(t)] = hit
        return hit[1]
