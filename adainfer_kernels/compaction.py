"""Batch compaction: finished rows leave the batch, the remaining layers run on fewer rows.

The layer loop keeps an *active set*: ``row_map[i]`` is the original batch row of active row i.
After an exit check, ``compact_rows`` drops the finished rows from every batch-leading tensor of
the layer state with one index computation and one gather per tensor, and updates ``row_map``.
At the end ``scatter_rows`` puts per-row results back in the original batch order.

This module holds the public, typed entry points. They dispatch to the C++ ops of
``adainfer_kernels._C`` (``torch.ops.adainfer.*``) when available and to the pure-PyTorch
implementation below otherwise (same semantics; ``reference.compact_rows_ref`` is the spec).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


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


def _check_keep(keep: torch.Tensor, row_map: torch.Tensor) -> None:
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise TypeError(f"keep must be a 1-D bool tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
    if row_map.dtype != torch.int64 or row_map.shape != keep.shape:
        raise ValueError(
            f"row_map must be int64 of shape {tuple(keep.shape)} (one entry per active row), "
            f"got {row_map.dtype} of shape {tuple(row_map.shape)}"
        )
    if row_map.device != keep.device:
        raise ValueError(f"keep is on {keep.device} but row_map is on {row_map.device}")


def _is_row_tensor(t: torch.Tensor, active: int) -> bool:
    """Batch-leading tensors have dim 0 == active; dim 0 == 1 is a broadcast (A == 1: a row)."""
    if t.dim() == 0:
        raise ValueError("cannot compact a 0-d tensor: batch-leading tensors need a row dimension")
    if t.shape[0] == active:
        return True
    if t.shape[0] == 1:
        return False
    raise ValueError(
        f"tensor of shape {tuple(t.shape)} is neither batch-leading ({active} active rows) nor a broadcast (dim 0 == 1)"
    )


def compact_rows(keep: torch.Tensor, row_map: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> Compaction:
    """Keep the rows where ``keep`` is True in every batch-leading tensor.

    Args:
        keep: (A,) bool over the active rows.
        row_map: (A,) int64 original batch row of each active row.
        tensors: tensors whose dim 0 is A (compacted) or 1 (broadcast, passed through), or None.

    Returns:
        Compaction (see its fields). Every active row lands in exactly one of ``row_map`` and
        ``finished_rows``, order preserved. All-true, all-false and A == 0 are legal.
    """
    _check_keep(keep, row_map)
    active = keep.shape[0]
    for t in tensors:
        if t is not None and t.device != keep.device:
            raise ValueError(f"tensor on {t.device} but keep is on {keep.device}")
    row_flags = [t is not None and _is_row_tensor(t, active) for t in tensors]
    # One index computation (one host sync on CUDA), then one gather per tensor.
    kept = torch.nonzero(keep).squeeze(1)
    finished = torch.nonzero(~keep).squeeze(1)
    out = [t.index_select(0, kept) if flag else t for t, flag in zip(tensors, row_flags, strict=True)]
    return Compaction(out, row_map.index_select(0, kept), kept, finished, row_map.index_select(0, finished))


def scatter_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[rows[i]] = values[i]`` in place (results back into original batch order); returns out.

    Args:
        out: (B, ...) full-batch tensor.
        rows: (n,) int64 distinct original rows in [0, B).
        values: (n, ...) with the trailing shape and dtype of ``out``.
    """
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if values.shape[0] != rows.shape[0] or values.shape[1:] != out.shape[1:]:
        raise ValueError(
            f"values of shape {tuple(values.shape)} do not fit rows {tuple(rows.shape)} of out {tuple(out.shape)}"
        )
    if values.dtype != out.dtype:
        raise TypeError(f"values are {values.dtype} but out is {out.dtype}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out.shape[0]):
        raise IndexError(f"rows must lie in [0, {out.shape[0]})")
    return out.index_copy_(0, rows, values)


def merge_rows(
    active_values: torch.Tensor,
    active_rows: torch.Tensor,
    fill_values: torch.Tensor,
    fill_rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Build a full-batch tensor from the active rows' values and fill values for the others.

    ``out[active_rows[i]] = active_values[i]`` and ``out[fill_rows[j]] = fill_values[j]``; the two
    row lists together must be a permutation of ``range(batch_size)``. The runtime uses it to give
    the cache each layer's new K/V for all rows during generation.

    Args:
        active_values: (A, ...) values of the rows still active.
        active_rows: (A,) int64 their original rows.
        fill_values: (F, ...) values of the other rows (same trailing shape and dtype).
        fill_rows: (F,) int64 their original rows.
        batch_size: B == A + F.

    Returns:
        (B, ...) tensor.
    """
    for name, rows, values in (("active", active_rows, active_values), ("fill", fill_rows, fill_values)):
        if rows.dtype != torch.int64 or rows.dim() != 1 or values.shape[0] != rows.shape[0]:
            raise ValueError(
                f"{name}_rows must be 1-D int64 with one entry per row of {name}_values "
                f"(got {rows.dtype} {tuple(rows.shape)} for values {tuple(values.shape)})"
            )
    if active_values.shape[1:] != fill_values.shape[1:] or active_values.dtype != fill_values.dtype:
        raise ValueError(
            f"active and fill values differ: {active_values.dtype} {tuple(active_values.shape)} vs "
            f"{fill_values.dtype} {tuple(fill_values.shape)}"
        )
    if active_rows.numel() + fill_rows.numel() != batch_size:
        raise ValueError(f"{active_rows.numel()} active + {fill_rows.numel()} fill rows != batch size {batch_size}")
    out = active_values.new_empty((batch_size, *active_values.shape[1:]))
    out.index_copy_(0, active_rows, active_values)
    out.index_copy_(0, fill_rows, fill_values)
    return out
