"""The compiled Triton exit head on a real GPU, at real shapes, against the reference.

Skipped without CUDA (CI runs the same kernels under the interpreter in test_exit_head.py); run by
bench/gpu_check.sh on a lent GPU with TRITON_INTERPRET=0. Tolerances as in exit_head_helpers.
"""

from __future__ import annotations

import os

import pytest
import torch
from exit_head_helpers import DTYPES, STOP_RULE, check_signals, make_head, make_hidden

from adainfer_kernels import exit_head
from adainfer_kernels.exit_head_triton import exit_head_triton
from adainfer_kernels.head import ReadoutHead
from adainfer_kernels.reference import exit_head_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
        reason="needs a CUDA device and TRITON_INTERPRET=0",
    ),
]

SHAPES = [(576, 49152), (4096, 32000), (4096, 128256)]
_HEADS: dict = {}


def _head(d: int, n_vocab: int, dt: str, norm: str = "rms", **kw) -> ReadoutHead:
    key = (d, n_vocab, dt, norm, tuple(sorted(kw.items())))
    if key not in _HEADS:
        _HEADS.clear()  # one big head at a time
        _HEADS[key] = make_head(d, n_vocab, DTYPES[dt], norm, seed=d, device="cuda", **kw)
    return _HEADS[key]


# Ordered by head so that each big head is drawn once (fp32 (4096, 128256) adds a 2 GB head for no
# new code path and is left out).
REAL_CASES = [
    (d, n_vocab, dt, n_rows)
    for d, n_vocab in SHAPES
    for dt in ("bf16", "fp16", "fp32")
    if not (dt == "fp32" and n_vocab == 128256)
    for n_rows in (1, 3, 8, 64, 256)
]


@pytest.mark.parametrize("d,n_vocab,dt,n_rows", REAL_CASES)
def test_real_shapes_public_entry(d, n_vocab, dt, n_rows):
    head = _head(d, n_vocab, dt)
    hidden = make_hidden(n_rows, head, DTYPES[dt])
    got = exit_head(hidden, head, STOP_RULE)
    assert got.top_prob.is_cuda
    check_signals(got, hidden, head, STOP_RULE)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
@pytest.mark.parametrize("n_rows", [1, 4, 17, 100])
@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
def test_both_variants_every_norm(variant, n_rows, norm):
    head = _head(576, 49152, "bf16", norm)
    hidden = make_hidden(n_rows, head, torch.bfloat16)
    check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
def test_logit_bias_project_out_unaligned(variant):
    head = make_head(1024, 50272, torch.float16, "layer", d_in=2048, subset=5000, bias=True, seed=1, device="cuda")
    hidden = make_hidden(9, head, torch.float16)
    check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)
    head = make_head(769, 32003, torch.bfloat16, "rms", seed=2, device="cuda")  # d, V not multiples of 16
    hidden = make_hidden(5, head, torch.bfloat16)
    check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)


@pytest.mark.parametrize("variant", ["splitv", "rowtile"])
def test_ties_and_non_finite_rows(variant):
    d, n_vocab = 64, 50000
    w = torch.zeros(n_vocab, d, device="cuda")
    w[:, :4] = torch.randint(-1, 2, (n_vocab, 4), device="cuda").float()
    for p in (7, 31000, 49999):
        w[p, :4] = 3.0
    hidden = torch.zeros(4, d, device="cuda")
    hidden[:, :4] = torch.tensor([1.0, 2.0, 3.0, 1.0], device="cuda")
    hidden[2, 5] = float("nan")
    head = ReadoutHead(weight=w.bfloat16(), norm="none")
    got = exit_head_triton(hidden.bfloat16(), head, STOP_RULE, variant=variant)
    assert got.argmax.tolist() == [7, 7, -1, 7]
    assert got.gap[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(got.top_prob[2]) and torch.isnan(got.score[2])
    ref = exit_head_ref(hidden.bfloat16()[[0]], head, STOP_RULE)
    torch.testing.assert_close(got.top_prob[[0]], ref.top_prob, rtol=1e-5, atol=1e-6)


# Ordered by dtype: each (256000, 2304) head is drawn once.
@pytest.mark.parametrize(
    "dt,variant,n_rows",
    [(dt, variant, n_rows) for dt in ("bf16", "fp32") for variant in ("splitv", "rowtile") for n_rows in (1, 8, 100)],
)
def test_gemma2_sized_head_with_rms_offset_and_softcap(dt, variant, n_rows):
    """Gemma2-2B's decode shape (2304, 256000) with Gemma's norm and the final-logit cap of 30."""
    head = _head(2304, 256000, dt, "rms_offset", logit_scale=10.0, softcap=30.0)
    hidden = make_hidden(n_rows, head, DTYPES[dt])
    check_signals(exit_head_triton(hidden, head, STOP_RULE, variant=variant), hidden, head, STOP_RULE)


@pytest.mark.parametrize("n_splits", [1, 7, 100000])
def test_split_counts(n_splits):
    head = _head(4096, 32000, "bf16")
    hidden = make_hidden(8, head, torch.bfloat16)
    check_signals(exit_head_triton(hidden, head, STOP_RULE, n_splits=n_splits), hidden, head, STOP_RULE)


def test_empty_rows():
    head = _head(576, 49152, "bf16")
    got = exit_head(torch.empty(0, 576, dtype=torch.bfloat16, device="cuda"), head, STOP_RULE)
    assert len(got) == 0 and got.score.is_cuda
