"""Batch compaction: finished rows leave the batch, the remaining layers run on fewer rows.

The layer loop keeps an *active set*: ``row_map[i]`` is the original batch row of active row i.
After an exit check, ``compact_rows`` drops the finished rows from every batch-leading tensor of
the layer state with one index computation and one gather per tensor, and updates ``row_map``.
At the end ``scatter_rows`` puts per-row results back in the original batch order. During
generation ``merge_rows`` builds a full-batch K/V block from the rows still active and the rows
that exited earlier (state propagation).

Backends (``backend.compaction_backend``): the C++ ops ``torch.ops.adainfer.*`` of
``adainfer_kernels._C`` (``csrc/compaction.cpp``, ``csrc/compaction_cuda.cu``) when the extension
is loaded; the pure-PyTorch implementation below otherwise (same semantics, same checks, same
exception types); ``ADAINFER_BACKEND=reference`` forces the specs of ``reference.py``.

Cost model: a compaction event reads and writes each kept row of each tensor once. The C++ op
computes the kept index once (one host sync on CUDA, none beyond it) and copies rows with memcpy
(CPU) or one batched vectorised gather (CUDA); torch boolean indexing recomputes ``nonzero`` (and
syncs) once per tensor and copies element-wise.

Exceptions, on every backend: TypeError for a wrong dtype, ValueError for a wrong shape or device,
IndexError for row indices out of range or repeated, RuntimeError for an ``out`` that overlaps.

Autograd: the C++ ops are inference-only (no backward). When grad mode is on and an input
requires grad, the wrappers use the differentiable torch path instead, so results stay correct.

The fake (meta) implementations at the bottom let the C++ ops trace under ``torch.compile``;
``csrc/ops.cpp`` names this module as their home (``set_python_module``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from adainfer_kernels import _native, backend, reference


class Compaction(NamedTuple):
    """Result of one compaction event over A active rows, A' of which are kept.

    Attributes:
        tensors: the inputs in order, compacted to A' rows (broadcast tensors and None unchanged).
        row_map: (A',) int64 original batch rows still active.
        kept: (A',) int64 positions in the previous active set that stay (ascending).
        finished: (A - A',) int64 positions in the previous active set that left (ascending).
        finished_rows: (A - A',) int64 original batch rows that left.
    """

    tensors: list[torch.Tensor | None]
    row_map: torch.Tensor
    kept: torch.Tensor
    finished: torch.Tensor
    finished_rows: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks: metadata only (no device sync), mirroring csrc/compaction.cpp.
# ---------------------------------------------------------------------------------------------


def _check_keep(keep: torch.Tensor, row_map: torch.Tensor) -> None:
    if keep.dtype != torch.bool:
        raise TypeError(f"compact_rows: keep must be a bool tensor, got {keep.dtype}")
    if keep.dim() != 1:
        raise ValueError(f"compact_rows: keep must be 1-D (one flag per active row), got shape {tuple(keep.shape)}")
    if row_map.dtype != torch.int64:
        raise TypeError(f"compact_rows: row_map must be int64, got {row_map.dtype}")
    if row_map.shape != keep.shape:
        raise ValueError(
            f"compact_rows: row_map must have keep's shape {tuple(keep.shape)} (one original row per active row), "
            f"got {tuple(row_map.shape)}"
        )
    if row_map.device != keep.device:
        raise ValueError(f"compact_rows: keep is on {keep.device} but row_map is on {row_map.device}")


def _row_flags(keep: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> list[bool]:
    """Which tensors are batch-leading (True) rather than broadcasts or None (False)."""
    active = keep.shape[0]
    device = keep.device
    flags = []
    for i, t in enumerate(tensors):
        if t is None:
            flags.append(False)
            continue
        shape = t.shape
        if t.device != device:
            raise ValueError(f"compact_rows: tensors[{i}] is on {t.device} but keep is on {device}")
        if not shape:
            raise ValueError(f"compact_rows: tensors[{i}] is 0-d; batch-leading tensors need a row dimension")
        if shape[0] == active:
            flags.append(True)  # with A == 1 a dim-0-of-1 tensor is a row, not a broadcast
        elif shape[0] == 1:
            flags.append(False)
        else:
            raise ValueError(
                f"compact_rows: tensors[{i}] of shape {tuple(shape)} is neither batch-leading "
                f"({active} active rows) nor a broadcast (dim 0 == 1)"
            )
    return flags


def _check_index(rows: torch.Tensor, op: str, name: str) -> None:
    if rows.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(rows.shape)}")


def _check_distinct(rows: Sequence[tuple[torch.Tensor, str]], bound: int) -> None:
    """IndexError unless every value lies in [0, bound) and none repeats across ``rows``."""
    values = torch.cat([r for r, _ in rows]) if len(rows) > 1 else rows[0][0]
    if values.numel() == 0:
        return
    names = " or ".join(name for _, name in rows)
    if int(values.min()) < 0 or int(values.max()) >= bound:
        raise IndexError(f"a value of {names} is out of range [0, {bound})")
    if int(torch.bincount(values, minlength=bound).max()) > 1:
        raise IndexError(f"a row of {names} repeats: every row must be written exactly once")


def _check_scatter(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    _check_index(rows, "scatter_rows", "rows")
    if out.dim() == 0:
        raise ValueError("scatter_rows: out is 0-d; it needs a batch dimension")
    if rows.device != out.device or values.device != out.device:
        raise ValueError(
            f"scatter_rows: out is on {out.device}, rows on {rows.device}, values on {values.device}; "
            "all must be on one device"
        )
    if values.dim() != out.dim() or values.shape[0] != rows.shape[0] or values.shape[1:] != out.shape[1:]:
        raise ValueError(
            f"scatter_rows: values of shape {tuple(values.shape)} do not fit rows of shape {tuple(rows.shape)} "
            f"and out of shape {tuple(out.shape)} (expected [rows, *out.shape[1:]])"
        )
    if values.dtype != out.dtype:
        raise TypeError(f"scatter_rows: values are {values.dtype} but out is {out.dtype}")


def _check_scatter_memory(out: torch.Tensor, values: torch.Tensor) -> None:
    """Overlap checks (real tensors only: fake tensors have no memory to compare)."""
    # As ATen's in-place ops: writing through an expanded `out`, or from values that alias it,
    # would give order-dependent results.
    if any(size > 1 and stride == 0 for size, stride in zip(out.shape, out.stride(), strict=True)):
        raise RuntimeError("scatter_rows: out is expanded (more than one element refers to a single memory location)")
    if _storage_ranges_intersect(out, values):
        raise RuntimeError("scatter_rows: values and out share memory; clone values first")


def _storage_ranges_intersect(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative overlap test: same storage and intersecting byte ranges."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.storage_offset() * t.element_size(), (last + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = span(a), span(b)
    return a_lo < b_hi and b_lo < a_hi


def _check_merge(
    active_values: torch.Tensor,
    active_rows: torch.Tensor,
    fill_values: torch.Tensor,
    fill_rows: torch.Tensor,
    batch_size: int,
) -> None:
    _check_index(active_rows, "merge_rows", "active_rows")
    _check_index(fill_rows, "merge_rows", "fill_rows")
    device = active_values.device
    if active_rows.device != device or fill_values.device != device or fill_rows.device != device:
        raise ValueError(
            f"merge_rows: all tensors must be on one device; got active_values on {device}, active_rows on "
            f"{active_rows.device}, fill_values on {fill_values.device}, fill_rows on {fill_rows.device}"
        )
    if active_values.dim() == 0:
        raise ValueError("merge_rows: active_values is 0-d; it needs a row dimension")
    if active_values.shape[0] != active_rows.shape[0]:
        raise ValueError(
            f"merge_rows: active_values has {active_values.shape[0]} rows but active_rows has "
            f"{active_rows.shape[0]} entries"
        )
    if fill_values.dim() != active_values.dim() or fill_values.shape[1:] != active_values.shape[1:]:
        raise ValueError(
            f"merge_rows: fill_values of shape {tuple(fill_values.shape)} must have the trailing shape of "
            f"active_values {tuple(active_values.shape)}"
        )
    if fill_values.shape[0] != fill_rows.shape[0]:
        raise ValueError(
            f"merge_rows: fill_values has {fill_values.shape[0]} rows but fill_rows has {fill_rows.shape[0]} entries"
        )
    if fill_values.dtype != active_values.dtype:
        raise TypeError(f"merge_rows: fill_values are {fill_values.dtype} but active_values are {active_values.dtype}")
    if batch_size < 0:
        raise ValueError(f"merge_rows: batch_size must be >= 0, got {batch_size}")
    if active_rows.shape[0] + fill_rows.shape[0] != batch_size:
        raise ValueError(
            f"merge_rows: {active_rows.shape[0]} active rows + {fill_rows.shape[0]} fill rows != batch_size "
            f"{batch_size} (together they must be a permutation of range(batch_size))"
        )


_choices: dict[tuple[str, str | None, bool], str] = {}


@torch.compiler.assume_constant_result
def _backend(device: torch.device) -> str:
    """``backend.compaction_backend(device).name``, memoised on what it depends on (device type,
    ``ADAINFER_BACKEND``, whether ``_C`` loaded): the full choice costs ~6 µs, a third of the
    native op on a decode-sized batch. A constant while torch.compile traces a caller (dynamo
    cannot trace the extension's build_info)."""
    key = (device.type, os.environ.get("ADAINFER_BACKEND"), _native.load() is not None)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = backend.compaction_backend(device).name
    return choice


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def compact_rows(keep: torch.Tensor, row_map: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> Compaction:
    """Keep the rows where ``keep`` is True in every batch-leading tensor.

    Args:
        keep: (A,) bool over the active rows.
        row_map: (A,) int64 original batch row of each active row.
        tensors: tensors whose dim 0 is A (compacted: hidden [A,T,d], masks [A,T] or [A,1,T,T],
            position ids, cos/sin, any dtype and trailing shape) or 1 with A != 1 (broadcast, passed
            through unchanged), or None (passed through).

    Returns:
        Compaction (see its fields). Compacted tensors are new contiguous tensors. Every active
        row lands in exactly one of ``row_map`` and ``finished_rows``, order preserved. All-true,
        all-false and A == 0 are legal.
    """
    _check_keep(keep, row_map)
    flags = _row_flags(keep, tensors)
    choice = _backend(keep.device)
    if choice == "native" and not _needs_autograd(*tensors):
        rows = [t for t, flag in zip(tensors, flags, strict=True) if flag]
        op = torch.ops.adainfer.compact_rows.default
        compacted, kept_rows, kept, finished, finished_rows = op(keep, row_map, rows)
        it = iter(compacted)
        out = [next(it) if flag else t for t, flag in zip(tensors, flags, strict=True)]
        return Compaction(out, kept_rows, kept, finished, finished_rows)
    if choice == "reference":
        ref_out, kept_rows, finished_rows = reference.compact_rows_ref(keep, row_map, tensors)
        kept, finished = torch.nonzero(keep).squeeze(1), torch.nonzero(~keep).squeeze(1)
        return Compaction(list(ref_out), kept_rows, kept, finished, finished_rows)
    # Torch fallback: one index computation, then one gather per tensor. A stable sort puts kept
    # positions first and finished ones after, each ascending; the kept count is the only value
    # the host needs (one sync on CUDA, where two nonzero calls would sync twice).
    order = torch.sort(keep.to(torch.uint8), descending=True, stable=True).indices
    n_kept = int(keep.sum())
    kept, finished = order[:n_kept], order[n_kept:]
    out = [t.index_select(0, kept) if flag else t for t, flag in zip(tensors, flags, strict=True)]
    return Compaction(out, row_map.index_select(0, kept), kept, finished, row_map.index_select(0, finished))


def scatter_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[rows[i]] = values[i]`` in place (results back into original batch order); returns out.

    Args:
        out: (B, ...) full-batch tensor, written in place (must not be expanded or alias values).
        rows: (n,) int64 distinct original rows in [0, B).
        values: (n, ...) with the trailing shape and dtype of ``out``.
    """
    choice = _backend(out.device)
    if choice == "native" and not _needs_autograd(out, values):
        torch.ops.adainfer.scatter_rows.default(out, rows, values)
        # The op writes through its own kernel: tell autograd that ``out`` changed, so that a graph
        # that saved ``out`` before refuses to backward through stale values (as for index_copy_).
        if not torch.is_inference(out):
            torch.autograd.graph.increment_version(out)
        return out
    _check_scatter(out, rows, values)
    _check_scatter_memory(out, values)
    _check_distinct([(rows, "rows")], out.shape[0])
    if choice == "reference":
        return reference.scatter_rows_ref(out, rows, values)
    return out.index_copy_(0, rows, values)


def merge_rows(
    active_values: torch.Tensor,
    active_rows: torch.Tensor,
    fill_values: torch.Tensor,
    fill_rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Full-batch tensor from the active rows' values and fill values for the other rows.

    Generation uses it per layer: the K/V block of all B rows, built from the rows still active and
    the state-propagated K/V of rows that exited earlier.

    Args:
        active_values: (A, ...) values of the active rows, any dtype.
        active_rows: (A,) int64 original row of each active value.
        fill_values: (F, ...) values for the other rows, with active_values' trailing shape and dtype.
        fill_rows: (F,) int64 original row of each fill value.
        batch_size: B == A + F; active_rows and fill_rows together must be a permutation of range(B).

    Returns:
        (B, ...) new contiguous tensor: row ``active_rows[i]`` is ``active_values[i]``, row
        ``fill_rows[j]`` is ``fill_values[j]``.
    """
    choice = _backend(active_values.device)
    if choice == "native" and not _needs_autograd(active_values, fill_values):
        return torch.ops.adainfer.merge_rows.default(active_values, active_rows, fill_values, fill_rows, batch_size)
    _check_merge(active_values, active_rows, fill_values, fill_rows, batch_size)
    _check_distinct([(active_rows, "active_rows"), (fill_rows, "fill_rows")], batch_size)
    if choice == "reference":
        return reference.merge_rows_ref(active_values, active_rows, fill_values, fill_rows, batch_size)
    out = active_values.new_empty((batch_size, *active_values.shape[1:]))
    out.index_copy_(0, active_rows, active_values)
    return out.index_copy_(0, fill_rows, fill_values)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations of the C++ ops, for torch.compile / FakeTensor tracing. They run
# the same metadata checks and return outputs with the shapes, dtypes and (contiguous) strides of
# the real kernels; the kept count is data-dependent, hence an unbacked size.
# ---------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    @torch.library.register_fake("adainfer::compact_rows")
    def _compact_rows_fake(
        keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_keep(keep, row_map)
        active = keep.shape[0]
        for i, t in enumerate(tensors):
            if t.device != keep.device:
                raise ValueError(f"compact_rows: tensors[{i}] is on {t.device} but keep is on {keep.device}")
            if t.dim() == 0 or t.shape[0] != active:
                raise ValueError(
                    f"compact_rows: tensors[{i}] has shape {tuple(t.shape)} but there are {active} active rows"
                )
        n_kept = torch.library.get_ctx().new_dynamic_size()
        torch._check(n_kept <= active)
        compacted = [t.new_empty((n_kept, *t.shape[1:])) for t in tensors]
        return (
            compacted,
            row_map.new_empty((n_kept,)),
            row_map.new_empty((n_kept,)),
            row_map.new_empty((active - n_kept,)),
            row_map.new_empty((active - n_kept,)),
        )

    @torch.library.register_fake("adainfer::scatter_rows")
    def _scatter_rows_fake(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        _check_scatter(out, rows, values)

    @torch.library.register_fake("adainfer::merge_rows")
    def _merge_rows_fake(
        active_values: torch.Tensor,
        active_rows: torch.Tensor,
        fill_values: torch.Tensor,
        fill_rows: torch.Tensor,
        batch_size: int,
    ) -> torch.Tensor:
        _check_merge(active_values, active_rows, fill_values, fill_rows, batch_size)
        return active_values.new_empty((batch_size, *active_values.shape[1:]))


if _native.has_op("compact_rows"):
    _register_fakes()
