"""A probe exit head is a ReadoutHead with a per-layer (K, d) weight, no norm, the K rows as
its subset and the probe bias as the logit bias: the fused exit head computes it on every backend
(CPU native, torch fallback, Triton under the interpreter) with no second code path, so it must
match the reference like any head. (The AOT gate compiles that path: norm 'none', subset, bias.)"""

from __future__ import annotations

import math

import pytest
import torch
from exit_head_helpers import STOP_RULE, check_signals

from adainfer_kernels.exit_head import _exit_head_cpu, _native_supports
from adainfer_kernels.exit_head_triton import exit_head_triton
from adainfer_kernels.head import ReadoutHead
from adainfer_kernels.reference import exit_head_ref


def probe_head(k: int, d: int, dtype: torch.dtype, seed: int = 0) -> ReadoutHead:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=g) * (3.0 / math.sqrt(d))
    return ReadoutHead(
        weight=weight.to(dtype),
        norm="none",
        vocab_subset=torch.arange(k),
        logit_bias=torch.randn(k, generator=g),
    )


BACKENDS = ["splitv", "rowtile", "torch", "native"]


def run(backend: str, hidden: torch.Tensor, head: ReadoutHead):
    if backend in ("splitv", "rowtile"):
        return exit_head_triton(hidden, head, STOP_RULE, variant=backend)
    if backend == "native" and not _native_supports(
        torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
    ):
        pytest.skip("the native CPU exit head is unavailable for this dtype here")
    with torch.inference_mode():
        return _exit_head_cpu(hidden, head, STOP_RULE, impl=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k", "d", "rows"), [(2, 64, 1), (2, 576, 5), (3, 96, 17), (4, 64, 33)])
def test_probe_head_matches_the_reference(backend, dtype, k, d, rows):
    head = probe_head(k, d, dtype, seed=k + d)
    hidden = (torch.randn(rows, d, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    got = run(backend, hidden, head)
    check_signals(got, hidden, head, STOP_RULE)
    # the answer is a label index (the subset is 0..K-1)
    assert set(got.argmax.tolist()) <= set(range(k))


def test_probe_head_answer_equals_softmax_of_the_probe_logits():
    head = probe_head(3, 64, torch.float32)
    hidden = torch.randn(9, 64)
    z = hidden @ head.weight.t() + head.logit_bias
    p = torch.softmax(z, dim=-1)
    sig = exit_head_ref(hidden, head)
    torch.testing.assert_close(sig.top_prob, p.max(-1).values)
    assert torch.equal(sig.argmax, p.argmax(-1))
