"""Shared helpers of the exit-head tests (CPU interpreter tests and the GPU tests).

Tolerances (docs/architecture.md, "Tests"; FlashAttention's rule): on top_prob, gap and score the error of a
backend against an accurate reference is at most 2x PyTorch's own error in the same dtype
(``exit_head_ref(..., upcast=False)``, Hugging Face's numerics) plus ATOL. The accurate reference
is the fp32 ``exit_head_ref`` for bf16/fp16 inputs and an fp64 evaluation for fp32 inputs (against
an fp32 reference PyTorch's own fp32 error would be zero by construction). argmax must be exact
except on near-ties: rows whose reference top-2 logit margin is below NEAR_TIE x PyTorch's own
max logit error (+ 1e-4).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule
from adainfer_kernels.reference import apply_norm_ref, exit_head_ref, head_logits_ref, signals_from_logits

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = 1e-5  # probabilities and scores live in [0, 1] and O(1)
NEAR_TIE = 4.0
STOP_RULE = StopRule(w_top_prob=1.5, w_gap=-2.0, offset=0.25)


def make_head(
    d: int,
    n_vocab: int,
    dtype: torch.dtype,
    norm: str,
    *,
    subset: int | None = None,
    bias: bool = False,
    d_in: int | None = None,
    logit_scale: float = 4.0,
    softcap: float | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> ReadoutHead:
    """A random head whose logits have standard deviation ~logit_scale (like a real LM's), before
    any soft-cap. ``norm="rms_offset"`` (Gemma) draws the stored weight w of the ``1 + w`` scale
    in [-0.5, 0.5) (the same draws as the other norms' weights in [0.5, 1.5)).

    The weight is drawn on ``device`` (a (128256, 4096) head takes seconds to draw on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    d_norm = d if d_in is None else d_in
    gw = g if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n_vocab, d, generator=gw, device=device) * (logit_scale / math.sqrt(d))
    nw = nb = None
    if norm != "none":
        nw = torch.rand(d_norm, generator=g) + 0.5
        if norm == "rms_offset":
            nw = nw - 1.0
    if norm == "layer":
        nb = torch.randn(d_norm, generator=g) * 0.1
    proj = torch.randn(d, d_in, generator=g) / math.sqrt(d_in) if d_in is not None else None
    ids = sb = None
    if subset is not None:
        ids = torch.randperm(n_vocab, generator=g)[:subset]
        if bias:
            sb = torch.randn(subset, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    if ids is not None:
        ids = ids.to(device)
        sb = sb.to(device) if sb is not None else None
    return ReadoutHead(
        weight=cast(w),
        norm=norm,
        norm_weight=cast(nw),
        norm_bias=cast(nb),
        eps=1e-5,
        project_out=cast(proj),
        vocab_subset=ids,
        logit_bias=sb,
        logit_softcap=softcap,
    )


def make_hidden(n_rows: int, head: ReadoutHead, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A non-zero mean and varied row scales exercise the norms' statistics.
    h = torch.randn(n_rows, head.hidden_size, generator=g) * (1 + 3 * torch.rand(n_rows, 1, generator=g)) + 0.3
    return h.to(device=head.weight.device, dtype=dtype)


def _double_head(head: ReadoutHead) -> ReadoutHead:
    cast = lambda t: None if t is None else t.double()
    return ReadoutHead(
        weight=cast(head.weight),
        norm=head.norm,
        norm_weight=cast(head.norm_weight),
        norm_bias=cast(head.norm_bias),
        eps=head.eps,
        project_out=cast(head.project_out),
        vocab_subset=head.vocab_subset,
        logit_bias=head.logit_bias,
        logit_softcap=head.logit_softcap,
    )


def accurate_reference(hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None) -> ExitSignals:
    if hidden.dtype != torch.float32:
        return exit_head_ref(hidden, head, stop_rule)
    ref = exit_head_ref(hidden.double(), _double_head(head), stop_rule, upcast=False)
    f = lambda t: None if t is None else t.float()
    return ExitSignals(f(ref.top_prob), f(ref.gap), ref.argmax, f(ref.score))


def near_ties(hidden: torch.Tensor, head: ReadoutHead) -> torch.Tensor:
    """Rows whose top-2 reference logits are closer than NEAR_TIE x PyTorch's own logit error."""
    if hidden.dtype == torch.float32:
        z = head_logits_ref(hidden.double(), _double_head(head), upcast=False)
    else:
        z = head_logits_ref(hidden, head, upcast=True).double()
    z_own = head_logits_ref(hidden, head, upcast=False).double()
    tol = NEAR_TIE * float((z_own - z).abs().max()) + 1e-4
    if z.shape[1] < 2:
        return torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    top2 = z.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) < tol


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _err_report(name: str, err: torch.Tensor, err_torch: torch.Tensor, bound: float) -> str:
    worst = torch.argsort(err, descending=True)[:5].tolist()
    return (
        f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > bound {bound:.3e} = 2 x PyTorch's "
        f"own max err {err_torch.max().item():.3e} (mean {err_torch.mean().item():.3e}) + {ATOL:g}; "
        f"worst rows {worst}"
    )


def check_signals(got: ExitSignals, hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None) -> None:
    """got vs the accurate reference under the 2x-PyTorch rule; argmax exact off near-ties."""
    ref = accurate_reference(hidden, head, stop_rule)
    own = exit_head_ref(hidden, head, stop_rule, upcast=False)
    n = hidden.shape[0]
    assert got.top_prob.shape == (n,) and got.top_prob.dtype == torch.float32
    assert got.gap.dtype == torch.float32 and got.argmax.dtype == torch.int64
    assert (got.score is None) == (stop_rule is None)
    for name in ("top_prob", "gap", "score"):
        a, r, o = getattr(got, name), getattr(ref, name), getattr(own, name)
        if r is None:
            continue
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN rows differ: {a} vs {r}"
        a, r, o = a.cpu(), r.cpu(), o.cpu()
        ok = ~torch.isnan(r)
        err = (a[ok].double() - r[ok].double()).abs()
        err_torch = (o[ok].double() - r[ok].double()).abs()
        bound = 2 * _max(err_torch) + ATOL
        assert _max(err) <= bound, _err_report(name, err, err_torch, bound)
    skip = near_ties(hidden, head).cpu()
    bad = (got.argmax.cpu() != ref.argmax.cpu()) & ~skip
    assert not bad.any(), (
        f"argmax differs on rows {bad.nonzero().flatten()[:8].tolist()} (not near-ties): "
        f"got {got.argmax.cpu()[bad][:8].tolist()} want {ref.argmax.cpu()[bad][:8].tolist()}; "
        f"{int(skip.sum())} near-tie rows skipped"
    )


def hf_numerics_signals(hidden: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None) -> ExitSignals:
    """Hugging Face's norm (rounded to the model dtype) and fp32 logits: what the fused paths compute
    (the logits and the soft-cap evaluated in fp64)."""
    x = apply_norm_ref(hidden, head, upcast=False).double()
    w = head.weight if head.vocab_subset is None else head.weight[head.vocab_subset]
    z = x @ w.double().t()
    if head.logit_softcap is not None:
        z = head.logit_softcap * torch.tanh(z / head.logit_softcap)
    if head.logit_bias is not None:
        z = z + head.logit_bias.double()
    top, gap, pos = signals_from_logits(z)
    argmax = pos if head.vocab_subset is None else head.vocab_subset[pos]
    top, gap = top.float(), gap.float()
    return ExitSignals(top, gap, argmax, stop_rule(top, gap) if stop_rule is not None else None)


def shard_bounds(n_vocab: int, n_shards: int) -> list[int]:
    """Uneven vocabulary shard bounds [0, b_1, ..., n_vocab]: with 2+ shards the second is a single
    row, the rest have different sizes (tensor-parallel shards of a vocabulary that does not divide)."""
    if n_shards == 1:
        return [0, n_vocab]
    rest = n_vocab - 1
    weights = [k + 2 for k in range(n_shards - 1)]  # 2, 3, 4, ...: uneven
    sizes = [rest * w // sum(weights) for w in weights]
    sizes[-1] += rest - sum(sizes)
    sizes = [sizes[0], 1, *sizes[1:]]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == n_vocab and all(b > a for a, b in itertools.pairwise(bounds))
    return bounds


def shard_head(head: ReadoutHead, start: int, end: int) -> ReadoutHead:
    """The vocab shard [start, end) of a full-vocabulary head: the same decode path, rows of W."""
    assert head.vocab_subset is None
    return dataclasses.replace(head, weight=head.weight[start:end])
