"""The plain-PyTorch specs themselves, on hand-made inputs with known answers."""

import math

import torch

from adainfer_kernels.compaction import compact_rows, scatter_rows
from adainfer_kernels.head import ReadoutHead, StopRule
from adainfer_kernels.reference import compact_rows_ref, exit_head_ref, signals_from_logits


def test_signals_on_hand_made_logits():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [1.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    top, gap, pos = signals_from_logits(logits)
    torch.testing.assert_close(top[0], torch.tensor(0.6))
    torch.testing.assert_close(gap[0], torch.tensor(0.4))
    assert pos.tolist() == [1, 0, 0]  # row 1 is an exact tie: the lower position wins
    assert gap[1].item() == 0.0


def test_single_candidate_has_gap_equal_to_top_prob():
    top, gap, pos = signals_from_logits(torch.tensor([[2.5], [-1.0]]))
    assert top.tolist() == [1.0, 1.0] and gap.tolist() == [1.0, 1.0] and pos.tolist() == [0, 0]


def test_rms_head_matches_manual_llama_numerics_and_subset_ids():
    d, v = 8, 10
    hidden = torch.randn(3, d)
    w = torch.randn(v, d)
    g = torch.rand(d) + 0.5
    subset = torch.tensor([7, 2, 5])
    bias = torch.tensor([0.0, 0.5, -0.5])
    head = ReadoutHead(weight=w, norm="rms", norm_weight=g, eps=1e-6, vocab_subset=subset, logit_bias=bias)
    normed = g * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6))
    logits = normed @ w[subset].t() + bias
    sig = exit_head_ref(hidden, head, StopRule(w_top_prob=2.0, w_gap=-1.0, offset=0.25))
    probs = logits.softmax(-1)
    torch.testing.assert_close(sig.top_prob, probs.max(-1).values)
    assert sig.argmax.tolist() == subset[logits.argmax(-1)].tolist()
    torch.testing.assert_close(sig.score, 2.0 * sig.top_prob - sig.gap + 0.25)


def test_non_finite_rows_get_nan_signals():
    head = ReadoutHead(weight=torch.randn(5, 4), norm="layer", norm_weight=torch.ones(4), norm_bias=torch.zeros(4))
    hidden = torch.randn(3, 4)
    hidden[1, 2] = float("inf")
    sig = exit_head_ref(hidden, head, StopRule(1.0, 1.0, 0.0))
    assert sig.argmax[1].item() == -1 and math.isnan(sig.top_prob[1]) and math.isnan(sig.score[1])
    assert sig.argmax[0].item() >= 0 and not math.isnan(sig.top_prob[2])


def test_compaction_fallback_matches_reference_and_scatters_back():
    keep = torch.tensor([True, False, True, False, True])
    row_map = torch.tensor([0, 2, 3, 6, 7])
    h = torch.randn(5, 4, 3)
    pos = torch.arange(4)[None]  # batch-1 broadcast
    mask = torch.rand(5, 1, 4, 4) > 0.5
    res = compact_rows(keep, row_map, [h, pos, mask, None])
    ref, ref_rows, ref_finished = compact_rows_ref(keep, row_map, [h, pos, mask, None])
    for got, want in zip(res.tensors, ref, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
    assert res.tensors[1] is pos
    assert torch.equal(res.row_map, ref_rows) and torch.equal(res.finished_rows, ref_finished)
    out = torch.full((8, 4, 3), -1.0)
    scatter_rows(out, res.row_map, res.tensors[0])
    scatter_rows(out, res.finished_rows, h[res.finished])
    assert torch.equal(out[row_map], h)
