"""Wall-clock speedup of the early-exit runtime on real prompts: full model vs AdaInfer.

Implements ``adainfer.calibration.evaluate.WallclockFn``. Prompts run in left-padded batches
(position ids count real tokens only, as in generation), with ``logits_to_keep=1`` (a classifier
needs the last position only, and the full LM head over every position would dilute what the
layers cost). Each batch runs once unpatched and once with the classifier, alternately, so that
load on a shared machine hits both alike; the patch is installed once and toggled with
``handle.enabled`` (when off, the model runs its original code).

Each batch is moved to the model's device before the clock starts, and the device is synchronised
before each clock read (CUDA kernels run asynchronously: without it the clock would time the
launches, not the work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.patch import patched


def padded_batches(
    tokenizer, prompts: list[str], batch_size: int, device: torch.device | str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches on ``device``, with position ids that skip the padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left (tokenizer.padding_side = 'left')")
    batches = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RuntimeWallclock:
    """``measure(model, tokenizer, prompts, classifier, batch_size) -> dict``.

    Attributes:
        max_prompts: time the first ``max_prompts`` prompts only (None: all); the result's
            ``rows`` says which were timed.
        config: the runtime's configuration (compact mode by default).
        warmup: batches run (both ways) before timing starts.
    """

    max_prompts: int | None = None
    config: AdaInferConfig = field(default_factory=AdaInferConfig)
    warmup: int = 1

    @torch.inference_mode()
    def __call__(self, model, tokenizer, prompts: list[str], classifier, batch_size: int) -> dict:
        n = len(prompts) if self.max_prompts is None else min(self.max_prompts, len(prompts))
        if n == 0:
            raise ValueError("no prompts to time")
        device = model.get_input_embeddings().weight.device
        batches = padded_batches(tokenizer, list(prompts[:n]), batch_size, device)
        full_s, ada_s, exits = 0.0, 0.0, []
        with patched(model, classifier, self.config) as handle:

            def run(batch, enabled: bool) -> float:
                handle.enabled = enabled
                synchronize(device)
                t0 = time.perf_counter()
                model(**batch, logits_to_keep=1)
                synchronize(device)
                return time.perf_counter() - t0

            for batch in batches[: self.warmup]:
                run(batch, False)
                run(batch, True)
            for i, batch in enumerate(batches):
                # Alternate which goes first so neither always runs on a warmer cache.
                order = (False, True) if i % 2 == 0 else (True, False)
                for enabled in order:
                    seconds = run(batch, enabled)
                    if enabled:
                        ada_s += seconds
                        exits.append(handle.last_stats.exit_layers.cpu().numpy())
                    else:
                        full_s += seconds
        return {
            "full_s": full_s,
            "adainfer_s": ada_s,
            "exit_layers": np.concatenate(exits),
            "rows": np.arange(n),
            "batch_size": batch_size,
        }
