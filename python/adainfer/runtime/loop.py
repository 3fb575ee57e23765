"""The model-agnostic early-exit layer loop (docs/architecture.md, "Data flow").

One forward pass over a batch of B rows is driven by the model's own decoder loop: while a patched
forward runs, the decoder's layer list yields L *steps* instead of its L layers. Step i receives
exactly what the decoder passes layer i (hidden states, mask, positions, rotary embeddings, cache),
so models whose layers receive different arguments (sliding-window layers of Gemma2, Qwen2 or
Mistral get their own mask) need no special case, and embeddings, cache creation, masks, rotary
embeddings and the final norm stay Hugging Face's own code:

    step i (layer k = i + 1), compact mode:
        kwargs <- the decoder's kwargs for layer i, restricted to the rows still active
        h = layer_i(h, **kwargs)                        # only the rows still active
        if k is checked:
            signals = exit_head(h[:, -1])               # fused norm -> LM head -> top-2 -> score
            rows with a stop decision are finished: exit layer k, hidden state frozen
            compact_rows(...)                           # h shrinks to the rows still active
        if k == L: scatter finished rows back -> (B, T, d); the decoder then runs its final norm

Generation: Hugging Face's ``DynamicCache`` grows every layer for the whole batch, so every layer
must receive K/V for all B rows at every step. Rows still active compute theirs; rows that exited
get K/V computed from their frozen exit state through that layer's own input norm and k/v
projections (+ RoPE), CALM's "state propagation" (the family's ``kv_fill``). ``rows.RowSubsetCache``
merges the two and hands the attention only the active rows' history. Once every row has stopped,
the remaining steps only fill K/V (no layer runs).

``LayerLoop`` (one per patched model) starts a ``LayerPass`` per forward call. The row bookkeeping
of a compact pass lives in ``runtime.rows``, what a pass did in ``runtime.stats.ExitStats``, and the
decoding of exit answers in ``runtime.decode``.
"""

from __future__ import annotations

import torch
from torch import nn

from adainfer.models import ModelFamily
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.core import check_rows
from adainfer.runtime.placement import (
    container_hooks_within,
    execution_device,
    materialised,
    modules_owning,
    to_device,
)
from adainfer.runtime.policy import ExitPolicy
from adainfer.runtime.rows import FinishedRows, RowSubsetCache, RowView
from adainfer.runtime.stats import ExitStats
from adainfer_kernels.compaction import compact_rows, merge_rows, scatter_rows
from adainfer_kernels.head import ReadoutHead

# kwargs of a decoder layer whose dim 0 is the batch (restricted to the active rows); the rest pass through.
_BATCH_KWARGS = ("attention_mask", "position_ids")
_ROPE_KWARG = "position_embeddings"
_CACHE_KWARGS = ("cache", "past_key_values")


class _LayerStep:
    """What the decoder iterates over instead of layer i while a patched forward runs.

    Calling it runs step i of the pass; attribute reads go to the real layer (decoders may read
    e.g. ``attention_type`` off their layers).
    """

    __slots__ = ("_index", "_layer", "_pass")

    def __init__(self, layer_pass: LayerPass, index: int, layer: nn.Module) -> None:
        self._pass = layer_pass
        self._index = index
        self._layer = layer

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("the AdaInfer layer loop expects keyword arguments after hidden_states")
        return self._pass.step(self._index, hidden_states, kwargs)

    def __getattr__(self, name):
        return getattr(self._layer, name)


class LayerLoop:
    """The early-exit loop of one patched model: its layers, checked layers, policy and readout head.

    ``start()`` begins one forward pass (a ``LayerPass``, whose ``steps`` the decoder iterates).
    """

    def __init__(
        self, model: nn.Module, family: ModelFamily, policy: ExitPolicy, config: AdaInferConfig, head: ReadoutHead
    ):
        self.model = model
        self.family = family
        self.policy = policy
        self.config = config
        self.base_head = head
        self.layers = list(family.layers(model)._modules.values())
        self.num_layers = len(self.layers)
        self.checked = frozenset(policy.layers_to_check(self.num_layers)) & config.checked_layers(self.num_layers)
        # Offloaded head parts (accelerate hooks: meta weights between calls) are loaded for each
        # check, and the head is read off the live modules then; otherwise the head is fixed.
        head_tensors = (head.weight, head.norm_weight, head.norm_bias, head.project_out)
        self._head_modules = modules_owning(model, head_tensors)

    def start(self) -> LayerPass:
        """A new pass, after following any change of the model's parts since the last one."""
        self.refresh()
        return _MaskedPass(self) if self.config.mode == "mask" else _CompactPass(self)

    def refresh(self) -> None:
        """Follow the model's current parts: its decoder layers (a layer added or removed) and
        its exit head (``resize_token_embeddings``, a new LM head or norm), read off the live
        modules; a classifier fitted for the model as it was is refused with its own error."""
        layers = list(self.family.layers(self.model)._modules.values())
        head = self.family.lens_head(self.model)
        same_layers = len(layers) == len(self.layers) and all(a is b for a, b in zip(layers, self.layers, strict=True))
        same_head = all(
            getattr(head, f) is getattr(self.base_head, f)
            for f in ("weight", "norm_weight", "norm_bias", "project_out")
        ) and (head.norm, head.eps, head.logit_softcap) == (
            self.base_head.norm,
            self.base_head.eps,
            self.base_head.logit_softcap,
        )
        if same_layers and same_head:
            return
        check = getattr(getattr(self.policy, "classifier", None), "check_compatible", None)
        if check is not None:
            check(self.model)  # e.g. the vocabulary or the layer count changed under the classifier
        if not same_layers:
            if not layers:
                raise RuntimeError("the model has no decoder layers left: nothing to run")
            self.layers = layers
            self.num_layers = len(layers)
            self.checked = frozenset(self.policy.layers_to_check(self.num_layers)) & self.config.checked_layers(
                self.num_layers
            )
        if not same_head:
            self.base_head = head
            tensors = (head.weight, head.norm_weight, head.norm_bias, head.project_out)
            self._head_modules = modules_owning(self.model, tensors)

    def check(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, stats: ExitStats) -> torch.Tensor:
        """(A,) bool: which of the active rows (original ids ``rows``, hidden (A, T, d)) stop at
        ``layer``; the answers of the rows that stop are recorded in ``stats`` (``core.check_rows``)."""
        with materialised(self._head_modules):
            base = self.family.lens_head(self.model) if self._head_modules else self.base_head
            return check_rows(self.policy, base, layer, hidden[:, -1, :], rows, stats)


class LayerPass:
    """One forward pass through the loop: ``steps[i]`` stands in for layer i.

    ``stats`` is set by step 0 and final once step L-1 has run (``complete``).
    """

    mode = ""

    def __init__(self, loop: LayerLoop) -> None:
        self.loop = loop
        self.steps = [_LayerStep(self, i, layer) for i, layer in enumerate(loop.layers)]
        self.stats: ExitStats | None = None
        self.steps_run = 0

    @property
    def complete(self) -> bool:
        return self.steps_run == self.loop.num_layers

    def step(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if i != self.steps_run:
            raise RuntimeError(f"the AdaInfer loop runs the layers once, in order; the decoder called layer {i} next")
        if i == 0:
            batch = h.shape[0]
            if hasattr(self.loop.policy, "begin_pass"):  # optional in ExitPolicy (ForcedExits checks B)
                self.loop.policy.begin_pass(batch)
            labels = self.loop.policy.label_token_ids
            self.stats = ExitStats.start(batch, self.loop.num_layers, self.mode, labels, h.device)
            self._begin(h, kwargs)
        out = self._step(i, h, kwargs)
        self.steps_run = i + 1
        return out

    def _checked(self, k: int) -> bool:
        return k in self.loop.checked and k < self.loop.num_layers

    def _begin(self, h: torch.Tensor, kwargs: dict) -> None:
        raise NotImplementedError

    def _step(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError


class _CompactPass(LayerPass):
    """Finished rows leave the batch; the remaining layers run on the rows still active."""

    mode = "compact"

    def _begin(self, h: torch.Tensor, kwargs: dict) -> None:
        self.batch = h.shape[0]
        self.row_map = torch.arange(self.batch, device=h.device)  # active row -> original row
        self.finished = FinishedRows()
        self.cache_key = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        self.active_view = RowView(self.batch, expand=False)
        self.finished_view = RowView(self.batch, expand=True)
        self._rope = None  # this step's rotary embeddings (cos, sin), for the K/V fill
        # Decode (one position per row): fewer finished rows than this run the layer frozen.
        self.compact_rows = self.loop.config.compact_rows_for(h.device) if h.shape[1] == 1 else 1
        self._frozen_batch: torch.Tensor | None = None  # (B, T, d) with the finished rows' exit states

    def _step(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        self._rope = kwargs.get(_ROPE_KWARG)
        cache = kwargs.get(self.cache_key) if self.cache_key else None
        if self.row_map.numel() == 0:
            # Every row has stopped: this layer only caches the finished rows' K/V.
            if cache is not None:
                self._fill_cache(cache, i)
        else:
            if self.finished and self.batch - self.row_map.numel() < self.compact_rows:
                h = self._run_frozen(i, h, kwargs)
            else:
                if self.finished:
                    kwargs = self._active_kwargs(kwargs, cache)
                h = self.loop.layers[i](h, **kwargs)
                self.stats.layer_rows += h.shape[0]
            k = i + 1
            if self._checked(k):
                h = self._exit(k, h)
        if i + 1 == self.loop.num_layers:
            return self._gather(h)
        return h

    def _run_frozen(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Layer i on the whole batch, the finished rows frozen at their exit state (mask mode for
        one layer: their K/V come from the layer itself, the same state propagation as the fill);
        returns the active rows' outputs. Cheaper than compacting while the layer's cost does not
        depend on its row count (a decode step of a small batch): no fill, no history gather."""
        rows = to_device(self.row_map, h.device)
        base = self._frozen_batch
        if base is None or base.device != h.device:  # once per exit event (and device)
            base = self._frozen_batch = self._gather(h)
            full = base
        else:  # the finished rows' states are unchanged since the event: only the active rows move in
            full = base.index_copy(0, rows, h)
        out = self.loop.layers[i](full, **kwargs)
        self.stats.layer_rows += out.shape[0]
        return out.index_select(0, rows)

    def _active_kwargs(self, kwargs: dict, cache) -> dict:
        kwargs = dict(kwargs)
        for name in _BATCH_KWARGS:
            if name in kwargs:
                kwargs[name] = self.active_view(kwargs[name])
        if kwargs.get(_ROPE_KWARG) is not None:
            kwargs[_ROPE_KWARG] = tuple(self.active_view(t) for t in kwargs[_ROPE_KWARG])
        if cache is not None:
            kwargs[self.cache_key] = RowSubsetCache(cache, self.row_map, self.batch, self._fill)
        return kwargs

    def _exit(self, k: int, h: torch.Tensor) -> torch.Tensor:
        # Layers may sit on several devices: the row bookkeeping follows the hidden states.
        self.row_map = to_device(self.row_map, h.device)
        stop = self.loop.check(k, h, self.row_map, self.stats)
        if not bool(stop.any()):
            return h
        # One compaction event: the hidden states shrink; the decoder's other batch-leading
        # arguments are restricted to the new active rows when the next layer receives them.
        result = compact_rows(~stop, self.row_map, [h])
        self.finished.add(result.finished_rows, h.index_select(0, result.finished))
        exit_layers = self.stats.exit_layers
        exit_layers.index_fill_(0, to_device(result.finished_rows, exit_layers.device), k)
        self.row_map = result.row_map
        self._frozen_batch = None
        self.active_view.reset(self.row_map)
        self.finished_view.reset(self.finished.packed()[0])
        return result.tensors[0]

    def _fill(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, K, V) on ``device`` of the finished rows for layer ``layer_idx``, from their frozen states."""
        rows, hidden = self.finished.packed()
        rope = None if self._rope is None else tuple(to_device(self.finished_view(t), device) for t in self._rope)
        layer = self.loop.layers[layer_idx]
        k, v = self.loop.family.kv_fill(layer, to_device(hidden, device), rope)
        return to_device(rows, device), to_device(k, device), to_device(v, device)

    def _fill_cache(self, cache, layer_idx: int) -> None:
        """Every row has stopped: layer ``layer_idx`` does not run, only the finished rows' K/V are cached."""
        layer = self.loop.layers[layer_idx]
        device = self._layer_device(layer_idx)
        with materialised(container_hooks_within(layer)):
            rows, k_fill, v_fill = self._fill(layer_idx, device)
        empty_k = k_fill.new_empty((0, *k_fill.shape[1:]))
        empty_v = v_fill.new_empty((0, *v_fill.shape[1:]))
        active = to_device(self.row_map, device)
        cache.update(
            merge_rows(empty_k, active, k_fill, rows, self.batch),
            merge_rows(empty_v, active, v_fill, rows, self.batch),
            layer_idx,
        )

    def _layer_device(self, layer_idx: int) -> torch.device:
        device = execution_device(self.loop.layers[layer_idx])
        return device if device is not None else self.row_map.device

    def _gather(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d): finished rows' frozen states and the active rows' outputs, in batch order."""
        if not self.finished:
            return h
        rows, hidden = self.finished.packed()
        device = h.device  # the last layer's device: the decoder's final norm runs there
        out = torch.empty((self.batch, *hidden.shape[1:]), dtype=hidden.dtype, device=device)
        scatter_rows(out, to_device(rows, device), to_device(hidden, device))
        if self.row_map.numel():
            scatter_rows(out, to_device(self.row_map, device), h)
        return out


class _MaskedPass(LayerPass):
    """The baseline: finished rows stay in the batch with their hidden state frozen."""

    mode = "mask"

    def _begin(self, h: torch.Tensor, kwargs: dict) -> None:
        self.done = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        self.frozen: torch.Tensor | None = None

    def _step(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        h = self.loop.layers[i](h, **kwargs)
        self.stats.layer_rows += h.shape[0]
        if self.frozen is not None:
            # Finished rows keep their exit state; the next layer sees it again (so its K/V are the
            # state-propagated ones, exactly as in compact mode). Out of place: autograd-safe.
            h = torch.where(self.done[:, None, None], self.frozen, h)
        k = i + 1
        if not self._checked(k):
            return h
        live = torch.nonzero(~self.done).squeeze(1)
        if live.numel() == 0:
            return h
        stop = self.loop.check(k, h.index_select(0, live), live, self.stats)
        new = live[stop]
        if new.numel():
            now = torch.zeros_like(self.done).index_fill_(0, new, True)
            self.frozen = h if self.frozen is None else torch.where(now[:, None, None], h, self.frozen)
            self.done = self.done | now
            self.stats.exit_layers.index_fill_(0, new, k)
        return h
