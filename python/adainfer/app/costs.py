"""The pre-flight's cost model measured on the user's model: a forward pass of r rows costs
``fixed + per_row * r`` (``adainfer.calibration.preflight.ForwardCost``)."""

from __future__ import annotations

import time

import torch

from adainfer.calibration.preflight import ForwardCost
from adainfer.runtime.wallclock import padded_batches, synchronize


@torch.inference_mode()
def measure_forward_cost(model, tokenizer, prompts: list[str], batch_size: int, reps: int = 2) -> ForwardCost:
    """The pre-flight's cost model (``adainfer.calibration.preflight.ForwardCost``): the unpatched
    model's forward (``logits_to_keep=1``) timed on ``batch_size`` of ``prompts`` and on a quarter
    of them (the same first rows), best of ``reps`` after one warm-up each, and the line
    ``fixed + per_row * r`` through the two points."""
    if len(prompts) < batch_size:
        raise ValueError(f"measuring a batch of {batch_size} needs {batch_size} prompts, got {len(prompts)}")
    device = model.get_input_embeddings().weight.device
    small = max(1, batch_size // 4)

    def best(rows: int) -> float:
        (batch,) = padded_batches(tokenizer, list(prompts[:rows]), rows, device)
        times = []
        for _ in range(reps + 1):
            synchronize(device)
            t0 = time.perf_counter()
            model(**batch, logits_to_keep=1)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    t_big, t_small = best(batch_size), best(small)
    if batch_size == small:
        return ForwardCost(fixed_s=0.0, per_row_s=t_big / batch_size, batch_size=batch_size)
    per_row = max(0.0, (t_big - t_small) / (batch_size - small))
    return ForwardCost(fixed_s=max(0.0, t_big - per_row * batch_size), per_row_s=per_row, batch_size=batch_size)
