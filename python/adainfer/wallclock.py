"""Wall-clock speedup of the early-exit runtime on real prompts: full model vs AdaInfer.

Implements ``adainfer.evaluate.WallclockFn``. Prompts run in left-padded batches (position ids
count real tokens only, as in generation), with ``logits_to_keep=1`` (a classifier needs the last
position only, and the full LM head over every position would dilute what the layers cost). Each
batch runs once unpatched and once with the classifier, alternately, so that load on a shared
machine hits both alike; the patch is installed once and toggled with ``handle.enabled`` (when off,
the model runs its original code).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adainfer.config import AdaInferConfig
from adainfer.patch import patched


def padded_batches(tokenizer, prompts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches with position ids that skip the padding."""
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left (tokenizer.padding_side = 'left')")
    batches = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(dict(enc))
    return batches


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
        batches = padded_batches(tokenizer, list(prompts[:n]), batch_size)
        full_s, ada_s, exits = 0.0, 0.0, []
        with patched(model, classifier, self.config) as handle:

            def run(batch, enabled: bool) -> float:
                handle.enabled = enabled
                t0 = time.perf_counter()
                model(**batch, logits_to_keep=1)
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
