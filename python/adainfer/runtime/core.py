"""The engine-neutral exit core: one exit check on the last token of the active rows.

What every engine adapter does after a checked layer k, whatever its batch layout (Hugging Face's
``[B, T, d]`` rows in ``runtime.loop``, vLLM's token-major ``[num_tokens, d]`` steps in
``adainfer.vllm``): take the last token's hidden state of each active row (request), ask the policy
which readout head and stop rule apply at k, run the fused exit head on those rows (one pass, no
``[rows, V]`` logits), decide, and record the answers of the rows that stop in ``ExitStats``:

    head, rule = policy.head_and_rule(k, base_head)
    signals    = exit_head(last, head, rule)          # top_prob, gap, argmax, score per row
    stop       = policy.should_stop(k, signals, rows)  # score > 0
    answers of rows[stop] -> stats                     # label log-probs, or the head's argmax

The adapter owns the rest: which rows are active, compacting them, the K/V of skipped layers and
delivering the recorded answers in its logits. The core knows rows, hidden states and a policy;
never Hugging Face or vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from adainfer.runtime.decode import exit_signals, label_logprobs
from adainfer.runtime.placement import to_device
from adainfer.runtime.policy import ExitPolicy
from adainfer.runtime.stats import ExitStats
from adainfer_kernels.head import ExitSignals, ReadoutHead

# (last (A, d), head, stop rule, device) -> ExitSignals: how an adapter decodes the rows (default:
# the fused exit head on the whole head; under tensor parallel, the merged partials of the shards).
Decode = Callable[[torch.Tensor, ReadoutHead, object, torch.device], ExitSignals]


@torch.no_grad()  # a stop decision is not differentiable; the exit head refuses autograd inputs
def check_rows(
    policy: ExitPolicy,
    base: ReadoutHead,
    layer: int,
    last: torch.Tensor,
    rows: torch.Tensor,
    stats: ExitStats,
    decode: Decode | None = None,
) -> torch.Tensor:
    """(A,) bool: which active rows stop after layer ``layer``.

    Args:
        policy: the exit policy (its readout head and stop rule per layer, its decision).
        base: the model's own readout head (final norm + LM head) at this call.
        layer: k, counted from 1 (the check after the k-th decoder layer).
        last: (A, d) hidden state of each active row's last token after layer k (the residual
            stream, as the model's final norm would receive it).
        rows: (A,) int64 original ids of those rows in ``stats``.
        stats: the pass's ``ExitStats``; the answers of the rows that stop are recorded there,
            and ``rows_checked`` / ``check_seconds`` grow.
        decode: how to get the signals of the rows (default ``decode.exit_signals``: the fused
            exit head); an adapter whose head is split over devices passes its own.
    """
    t0 = time.perf_counter()
    head, stop_rule = policy.head_and_rule(layer, base)
    if policy.needs_signals:
        signals = (decode or exit_signals)(last, head, stop_rule, last.device)
        stop = policy.should_stop(layer, signals, rows)
    else:  # decided without the signals: decode only the rows that stop
        stop = policy.should_stop(layer, None, rows)
        signals = None
    if bool(stop.any()):
        stopped = last[stop]
        if head.vocab_subset is not None:
            stats.record_answers(rows[stop], label_logprobs(to_device(stopped, head.weight.device), head), None)
        elif signals is None:  # decoded once, from the model's own logits (ExitStats)
            stats.defer_answers(rows[stop], stopped, head)
        else:
            kept = ExitSignals(signals.top_prob[stop], signals.gap[stop], signals.argmax[stop])
            stats.record_answers(rows[stop], None, kept)
    stats.rows_checked += rows.numel()
    stats.check_seconds += time.perf_counter() - t0
    return stop
