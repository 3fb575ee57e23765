"""The model-agnostic early-exit layer loop (docs/architecture.md, "Data flow").

One forward pass over a batch of B rows:

    for layer k = 1..L:
        h = layer_k(h, mask, positions, cache)          # only the rows still active
        if k is checked:
            signals = exit_head(h[:, -1])               # fused norm -> LM head -> top-2 -> score
            rows with a stop decision are finished: exit layer k, hidden state frozen
            compact_rows(...)                           # h, mask, positions shrink to the rest
    scatter finished rows back -> (B, T, d) -> the model's final norm and LM head, as usual

The loop runs inside the model's own decoder forward (the patch makes ``layers[:n]`` yield this
runner once), so embeddings, cache creation, masks and rotary embeddings are Hugging Face's own.

Generation: Hugging Face's ``DynamicCache`` grows every layer for the whole batch, so every layer
must receive K/V for all B rows at every step. Rows still active compute theirs; rows that exited
get K/V computed from their frozen exit state through that layer's input norm and k/v projections
(+ RoPE), CALM's "state propagation". ``_RowSubsetCache`` merges the two and hands the attention
only the active rows' history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from adainfer.models import ModelFamily
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.policy import ExitPolicy
from adainfer_kernels.compaction import compact_rows, merge_rows, scatter_rows
from adainfer_kernels.exit_head import exit_head
from adainfer_kernels.head import ExitHead

# kwargs of a decoder layer whose dim 0 is the batch (compacted with the rows); the rest pass through.
_BATCH_KWARGS = ("attention_mask", "position_ids")
_CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class ExitStats:
    """What one forward call did.

    Attributes:
        exit_layers: (B,) int64 layers run per row (L for rows that never exited early).
        num_layers: L.
        rows_checked: exit-head rows evaluated, summed over checks.
        check_seconds: wall time spent in exit checks (exit head + decision).
        layer_rows: decoder-layer rows actually computed, summed over layers (B * L without exits
            in compact mode; always B * L in mask mode).
        mode: "compact" or "mask".
    """

    exit_layers: torch.Tensor
    num_layers: int
    rows_checked: int = 0
    check_seconds: float = 0.0
    layer_rows: int = 0
    mode: str = "compact"

    @property
    def batch_size(self) -> int:
        return self.exit_layers.numel()

    @property
    def layers_saved_fraction(self) -> float:
        """1 - (layers run per row, averaged) / L: the paper's layer pruning ratio for this call."""
        if self.batch_size == 0:
            return 0.0
        return 1.0 - float(self.exit_layers.float().mean()) / self.num_layers


@dataclass
class _Finished:
    """Rows that exited during this pass: original ids, frozen hidden states and positions."""

    rows: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    rope: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, rows: torch.Tensor, hidden: torch.Tensor, rope) -> None:
        self.rows.append(rows)
        self.hidden.append(hidden)
        if rope is not None:
            self.rope.append(rope)

    def packed(self):
        """(rows (F,), hidden (F, T, d), rope or None), concatenated over exit events."""
        if len(self.rows) > 1:
            self.rows = [torch.cat(self.rows)]
            self.hidden = [torch.cat(self.hidden)]
            if self.rope:
                self.rope = [(torch.cat([c for c, _ in self.rope]), torch.cat([s for _, s in self.rope]))]
        return self.rows[0], self.hidden[0], (self.rope[0] if self.rope else None)


class _RowSubsetCache:
    """The model's cache, seen by a layer that runs on a subset of the batch's rows.

    ``update`` receives K/V of the active rows only; it adds the state-propagated K/V of rows that
    already finished (so the real cache grows for all B rows, in batch order) and returns the
    active rows' full history for attention. Everything else is delegated to the real cache.
    """

    def __init__(self, cache, active_rows: torch.Tensor, batch_size: int, fill) -> None:
        self._cache = cache
        self._active_rows = active_rows
        self._batch_size = batch_size
        self._fill = fill  # layer_idx -> (rows, K, V) of the finished rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows, k_fill, v_fill = self._fill(layer_idx)
        keys = merge_rows(key_states, self._active_rows, k_fill, rows, self._batch_size)
        values = merge_rows(value_states, self._active_rows, v_fill, rows, self._batch_size)
        keys, values = self._cache.update(keys, values, layer_idx, *args, **kwargs)
        return keys.index_select(0, self._active_rows), values.index_select(0, self._active_rows)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _rows_of(t: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``rows`` of a batch-leading tensor; a broadcast (dim 0 == 1) is expanded to them."""
    if t.shape[0] == batch:
        return t.index_select(0, rows)
    return t.expand(rows.numel(), *t.shape[1:])


class LayerLoop:
    """Runs the decoder layers of one model with early exits; one instance per patched model."""

    def __init__(
        self, model: nn.Module, family: ModelFamily, policy: ExitPolicy, config: AdaInferConfig, head: ExitHead
    ):
        self.model = model
        self.family = family
        self.policy = policy
        self.config = config
        self.base_head = head
        self.layers = list(family.layers(model)._modules.values())
        self.num_layers = len(self.layers)
        self.checked = frozenset(policy.layers_to_check(self.num_layers)) & config.checked_layers(self.num_layers)
        self.last_stats: ExitStats | None = None
        self.on_stats = None  # callback(ExitStats), set by the handle

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("the AdaInfer layer loop expects keyword arguments after hidden_states")
        if self.config.mode == "mask":
            out, stats = self._run_masked(hidden_states, kwargs)
        else:
            out, stats = self._run_compact(hidden_states, kwargs)
        self.last_stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)
        return out

    # -- the check ---------------------------------------------------------------------------
    @torch.no_grad()  # a stop decision is not differentiable; the exit head refuses autograd inputs
    def _check(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, stats: ExitStats):
        t0 = time.perf_counter()
        head, score = self.policy.head_and_score(layer, self.base_head)
        signals = exit_head(hidden[:, -1, :], head, score)
        stop = self.policy.should_stop(layer, signals, rows)
        stats.rows_checked += rows.numel()
        stats.check_seconds += time.perf_counter() - t0
        return stop

    # -- compact mode ----------------------------------------------------------------------------
    def _run_compact(self, h: torch.Tensor, kwargs: dict):
        batch, num_layers = h.shape[0], self.num_layers
        device = h.device
        cache_key = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        cache = kwargs.get(cache_key) if cache_key else None
        rope = kwargs.get("position_embeddings")
        row_map = torch.arange(batch, device=device)
        exit_layers = torch.full((batch,), num_layers, dtype=torch.int64, device=device)
        stats = ExitStats(exit_layers=exit_layers, num_layers=num_layers, mode="compact")
        finished = _Finished()
        layer_kwargs = dict(kwargs)

        def fill(layer_idx: int):
            rows, hidden, rope_rows = finished.packed()
            k, v = self.family.kv_fill(self.layers[layer_idx], hidden, rope_rows)
            return rows, k, v

        next_layer = 0
        for i, layer in enumerate(self.layers):
            next_layer = i + 1
            if cache is not None and finished:
                layer_kwargs[cache_key] = _RowSubsetCache(cache, row_map, batch, fill)
            h = layer(h, **layer_kwargs)
            stats.layer_rows += h.shape[0]
            k = i + 1
            if k not in self.checked or k >= num_layers:
                continue
            stop = self._check(k, h, row_map, stats)
            if not bool(stop.any()):
                continue
            # One compaction event: the hidden states and every batch-leading kwarg shrink together.
            active_rope = layer_kwargs.get("position_embeddings")
            bundle = [h] + [layer_kwargs.get(n) for n in _BATCH_KWARGS]
            if active_rope is not None:
                bundle += list(active_rope)
            result = compact_rows(~stop, row_map, bundle)
            stopped_hidden = h.index_select(0, result.finished)
            stopped_rope = None
            if rope is not None:
                stopped_rope = tuple(_rows_of(t, result.finished_rows, batch) for t in rope)
            finished.add(result.finished_rows, stopped_hidden, stopped_rope)
            exit_layers.index_fill_(0, result.finished_rows, k)
            h = result.tensors[0]
            for name, t in zip(_BATCH_KWARGS, result.tensors[1 : 1 + len(_BATCH_KWARGS)], strict=True):
                if name in layer_kwargs:
                    layer_kwargs[name] = t
            if active_rope is not None:
                layer_kwargs["position_embeddings"] = tuple(result.tensors[1 + len(_BATCH_KWARGS) :])
            row_map = result.row_map
            if row_map.numel() == 0:
                break

        if cache is not None and finished:
            # Every row left before the last layer: the layers not run still need K/V for all rows.
            for j in range(next_layer, num_layers):
                rows, k_fill, v_fill = fill(j)
                empty_k = k_fill.new_empty((0, *k_fill.shape[1:]))
                empty_v = v_fill.new_empty((0, *v_fill.shape[1:]))
                cache.update(
                    merge_rows(empty_k, row_map, k_fill, rows, batch),
                    merge_rows(empty_v, row_map, v_fill, rows, batch),
                    j,
                )

        if not finished:
            return h, stats
        rows, hidden, _ = finished.packed()
        out = h.new_empty((batch, *h.shape[1:]))
        scatter_rows(out, rows, hidden)
        if row_map.numel():
            scatter_rows(out, row_map, h)
        return out, stats

    # -- mask mode (the baseline: finished rows stay in the batch) ---------------------------------
    def _run_masked(self, h: torch.Tensor, kwargs: dict):
        batch, num_layers = h.shape[0], self.num_layers
        device = h.device
        exit_layers = torch.full((batch,), num_layers, dtype=torch.int64, device=device)
        stats = ExitStats(exit_layers=exit_layers, num_layers=num_layers, mode="mask")
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        frozen = None
        for i, layer in enumerate(self.layers):
            h = layer(h, **kwargs)
            stats.layer_rows += h.shape[0]
            if frozen is not None:
                # Finished rows keep their exit state; the next layer sees it again (so its K/V are
                # the state-propagated ones, exactly as in compact mode).
                h = torch.where(done[:, None, None], frozen, h)
            k = i + 1
            if k not in self.checked or k >= num_layers:
                continue
            live = torch.nonzero(~done).squeeze(1)
            if live.numel() == 0:
                continue
            stop = self._check(k, h.index_select(0, live), live, stats)
            new = live[stop]
            if new.numel():
                frozen = h.clone() if frozen is None else frozen
                frozen.index_copy_(0, new, h.index_select(0, new))
                done.index_fill_(0, new, True)
                exit_layers.index_fill_(0, new, k)
        return h, stats
