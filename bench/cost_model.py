"""A per-layer cost model of one forward step, measured on the machine that runs the benchmark.

The ideal time of a step with early exits is built from parts timed on their own, on the same
machine, at the same context length:

    layer(r, t)   one decoder layer on r rows (T new positions each) with t cached positions
    fill(r, t)    the K/V of r rows that skipped a layer: input norm -> k/v projections (+ RoPE),
                  written to that layer's cache (CALM's state propagation)
    check(r)      one exit check (the fused exit head) on r rows; only policies that read signals
    head(r)       the model's final norm + LM head on r rows (every step pays it once)

Every part is timed cold (``harness.time_fn(cold=True)``: a buffer larger than the last-level cache
is written before each call, since in the model a layer's weights and K/V history were evicted by
the other layers since its last step). A layer timed alone
still does not cost exactly what it costs inside the model (caches, other layers'
weights, the embedding and sampling around them), so the layer and fill costs are scaled by one
factor per configuration, kappa = (full step - head(B)) / (L x layer(B, t)), which makes the model
reproduce the unpatched model's measured step exactly. For a step where layer l runs on A_l of the
B rows (F_l = B - A_l have stopped before it):

    ideal = head(B) + kappa x sum_l min(layer(B, t),  layer(A_l, t) + fill(F_l, t))  + checks

The ``min`` says that a finished row may also stay in the batch with its state frozen (its K/V from
the layer itself are then the state-propagated ones, mask mode): where a layer costs the same at A
and at B rows (small batches stream the weights whatever the row count), the best a runtime can do
is not to compact at all. Rows are interpolated linearly between the measured row counts.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from harness import time_fn


def _median_s(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median seconds of ``fn`` timed cold: a part timed alone must not read from cache what the
    model reads from memory."""
    return time_fn(fn, warmup=warmup, reps=reps, device=device, cold=True).median / 1e3


def _interp(points: dict[int, float], r: float) -> float:
    """Linear interpolation of a cost measured at a few row counts (0 rows cost 0)."""
    if r <= 0:
        return 0.0
    xs = sorted(points)
    if r in points:
        return points[int(r)]
    i = bisect.bisect_left(xs, r)
    if i == 0:
        x1 = xs[0]
        return points[x1] * r / x1
    if i == len(xs):  # beyond the largest measured count: scale the last segment
        x0, x1 = xs[-2], xs[-1]
    else:
        x0, x1 = xs[i - 1], xs[i]
    y0, y1 = points[x0], points[x1]
    return y0 + (y1 - y0) * (r - x0) / (x1 - x0)


@dataclass
class StepCosts:
    """Seconds of each part of a step at one context length ``t`` and ``new`` positions per row."""

    t: int
    new: int
    layer: dict[int, float] = field(default_factory=dict)
    fill: dict[int, float] = field(default_factory=dict)
    check: dict[int, float] = field(default_factory=dict)
    head: dict[int, float] = field(default_factory=dict)

    def layer_s(self, r: float) -> float:
        return _interp(self.layer, r)

    def fill_s(self, r: float) -> float:
        return _interp(self.fill, r)

    def check_s(self, r: float) -> float:
        return _interp(self.check, r) if self.check else 0.0

    def head_s(self, r: float) -> float:
        return _interp(self.head, r)

    def kappa(self, full_step_s: float, batch: int, num_layers: int) -> float:
        """The factor that makes L x layer(B) + head(B) equal the full model's measured step."""
        return max(full_step_s - self.head_s(batch), 0.0) / (num_layers * self.layer_s(batch))

    def layers_ideal_s(self, active: Sequence[int], batch: int) -> float:
        """Ideal seconds of the L layers when layer l runs on ``active[l]`` rows of ``batch``."""
        total = 0.0
        for a in active:
            if a >= batch:
                total += self.layer_s(batch)
            else:
                total += min(self.layer_s(batch), self.layer_s(a) + self.fill_s(batch - a))
        return total

    def checks_s(self, checked_rows: Sequence[int]) -> float:
        """Seconds of exit checks on the given row counts (one entry per checked layer)."""
        return sum(self.check_s(r) for r in checked_rows if r > 0)


def active_rows(exit_layers: Sequence[int], num_layers: int) -> list[int]:
    """(L,) rows that run layer l (1-based l = index + 1) when row r stops after ``exit_layers[r]``."""
    return [sum(1 for e in exit_layers if min(int(e), num_layers) >= layer) for layer in range(1, num_layers + 1)]


def _row_counts(batch: int) -> list[int]:
    counts = {batch}
    r = 1
    while r < batch:
        counts.add(r)
        r *= 2
    counts.update({max(1, batch // 2), max(1, (3 * batch) // 4), max(1, batch // 4)})
    return sorted(counts)


@torch.inference_mode()
def measure(
    model, batch: int, t: int, new: int, head=None, stop_rule=None, reps: int = 7, warmup: int = 2
) -> StepCosts:
    """Time the parts of a step of ``model`` (a patched-family causal LM) at ``batch`` rows.

    ``new`` positions per row (1: decode; the prompt length: prefill with ``t`` = 0), ``t`` cached
    positions before them. ``head`` (a ``ReadoutHead``) and ``stop_rule`` (a ``StopRule`` or None)
    time the exit check too.
    """
    from adainfer.models import family_for

    from adainfer_kernels.exit_head import exit_head as run_exit_head

    family = family_for(model)
    decoder = family.decoder(model)
    layers = family.layers(model)
    idx = len(layers) // 2
    cfg = model.config
    d = cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    costs = StepCosts(t=t, new=new)
    gen = torch.Generator(device="cpu").manual_seed(0)
    parts = dict(model=model, family=family, decoder=decoder, layer=layers[idx], idx=idx, dims=(d, kv_heads, head_dim))
    for r in _row_counts(batch):
        _measure_rows(costs, r, t, new, gen, parts, head, stop_rule, reps, warmup, run_exit_head)
    return costs


def _measure_rows(costs: StepCosts, r, t, new, gen, parts, head, stop_rule, reps, warmup, run_exit_head) -> None:
    from transformers import DynamicCache

    model, family, decoder, layer, idx = (parts[k] for k in ("model", "family", "decoder", "layer", "idx"))
    d, kv_heads, head_dim = parts["dims"]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    rotary = getattr(decoder, "rotary_emb", None)
    hidden = torch.randn(r, new, d, generator=gen).to(device=device, dtype=dtype)
    pos = torch.arange(t, t + new, device=device)[None]
    rope = rotary(hidden, pos) if rotary is not None else None
    past_k = torch.randn(r, kv_heads, t, head_dim, generator=gen).to(device=device, dtype=dtype)
    past_v = torch.randn(r, kv_heads, t, head_dim, generator=gen).to(device=device, dtype=dtype)

    def fresh_caches(n: int) -> list:
        # The cache grows by `new` at each call: a fresh one per call keeps t fixed. Each call then
        # pays what a step pays: the concatenation of its new K/V onto the t cached positions.
        caches = []
        for _ in range(n):
            cache = DynamicCache(config=model.config)
            if t:
                cache.update(past_k, past_v, idx)
            caches.append(cache)
        return iter(caches)

    kwargs = {"attention_mask": None, "position_ids": pos, "use_cache": True}
    if rope is not None:
        kwargs["position_embeddings"] = rope
    cache_key = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"
    caches = fresh_caches(warmup + reps)
    costs.layer[r] = _median_s(lambda: layer(hidden, **kwargs, **{cache_key: next(caches)}), warmup, reps, device)

    fills = fresh_caches(warmup + reps)

    def run_fill():
        k, v = family.kv_fill(layer, hidden, rope)
        return next(fills).update(k, v, idx)

    costs.fill[r] = _median_s(run_fill, warmup, reps, device)
    last = hidden[:, -1:]
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layer_norm", None)
    lm_head = model.get_output_embeddings()
    costs.head[r] = _median_s(lambda: lm_head(norm(last) if norm is not None else last), warmup, reps, device)
    if head is not None:
        rows = last[:, 0].contiguous()
        costs.check[r] = _median_s(lambda: run_exit_head(rows, head, stop_rule), warmup, reps, device)
