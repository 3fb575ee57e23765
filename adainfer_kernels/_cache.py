"""A small cache of values derived from tensors, keyed by the tensors' identity and version.

The exit head derives things from a model's head tensors that are worth computing once, not on
every call: the validated vocabulary subset (range and duplicate checks read the ids, a host sync
on CUDA) and the CPU path's prepared (re-laid-out) LM-head weight. An entry is reused only while
the very same tensor objects are passed with unchanged storage, shape, dtype and version counter;
it is dropped as soon as one of its tensors is garbage-collected, so a cached copy of a model's
weight never outlives the model.

Limitation: tensors created under ``torch.inference_mode()`` have no version counter, so an
in-place update of such a tensor (inside inference mode) is not detected.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _state(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    try:
        version = t._version
    except RuntimeError:  # inference tensors do not track versions
        version = -1
    return (t.data_ptr(), version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class IdentityCache:
    """At most ``max_entries`` values keyed by a tuple of tensors (or None), least recently used out."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[list, tuple, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensors: Sequence[torch.Tensor | None], make: Callable[[], Any]) -> Any:
        """The cached value for ``tensors``, or ``make()`` (stored) when absent or stale."""
        key = tuple(0 if t is None else id(t) for t in tensors)
        state = tuple(_state(t) for t in tensors)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                refs, old_state, value = entry
                alive = all(
                    (r is None and t is None) or (r is not None and r() is t)
                    for r, t in zip(refs, tensors, strict=True)
                )
                if alive and old_state == state:
                    self._entries.move_to_end(key)
                    return value
                del self._entries[key]
        value = make()
        drop = self._dropper(key)
        refs = [None if t is None else weakref.ref(t, drop) for t in tensors]
        with self._lock:
            self._entries[key] = (refs, state, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def _dropper(self, key: tuple[int, ...]) -> Callable[[object], None]:
        def drop(_ref: object) -> None:
            with self._lock:
                self._entries.pop(key, None)

        return drop

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
