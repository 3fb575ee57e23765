"""Decoding an exit answer from rows' last hidden states, for the layer loop and ``ExitStats``.

``exit_signals`` runs the fused exit head (top-1 probability, gap, argmax over the readout head's
vocabulary, and the stop rule's score); ``label_logprobs`` gives the (S, K) log-probabilities over
the label tokens of a head with a vocabulary subset. The loop decodes at a check; ``ExitStats``
decodes the exits a policy decided without signals (pending answers) only when they are read.
"""

from __future__ import annotations

import torch

from adainfer.runtime.placement import to_device
from adainfer_kernels.exit_head import exit_head
from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule, decode_rows


def exit_signals(
    last: torch.Tensor, head: ReadoutHead, stop_rule: StopRule | None, device: torch.device
) -> ExitSignals:
    """The exit head on rows' last positions ``last`` (S, d), computed where the head is (the few
    rows move there, never the LM head to the rows), returned on ``device``. Rows are cast to the
    head's dtype where it differs (a probe's fp32 weight under a bf16 model: ``ClassifierPolicy``)."""
    rows = to_device(last, head.weight.device)
    if rows.dtype != head.weight.dtype:
        rows = rows.to(head.weight.dtype)
    signals = exit_head(rows, head, stop_rule)
    if signals.top_prob.device != device:
        signals = ExitSignals(*(None if t is None else t.to(device) for t in vars(signals).values()))
    return signals


def label_logprobs(last: torch.Tensor, head: ReadoutHead) -> torch.Tensor:
    """(S, K) fp32 log-probabilities over a head's vocabulary subset (the label tokens) of rows
    (S, d): the norm and ``project_out`` with Hugging Face's ops, then fp32 logits of the K subset
    rows (+ the logit bias), as the exit head computes them (a K-row product: cheap)."""
    x = decode_rows(last, head).float()
    w = head.weight.index_select(0, head.vocab_subset).float()
    z = x @ w.t()
    cap = head.logit_softcap
    if cap is not None:  # the model's own final-logit soft-capping comes before the label bias
        z = torch.tanh(z / cap) * cap
    if head.logit_bias is not None:
        z = z + head.logit_bias
    return torch.log_softmax(z, dim=-1)
