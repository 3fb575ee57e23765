"""The exit answer, delivered in the logits a patched ``*ForCausalLM`` returns.

After the decoder's pass, ``ExitStats`` knows the answer of every row that stopped early (recorded
by the exit check). ``deliver_answers`` completes it from the model's own last-position logits for
the rows that ran every layer, and, in label mode (the policy answers over K label tokens),
rewrites the last-position logits of the rows whose answer is not the model's own:

    logits[r, -1, v] = log p_r(label k)   if v is label token k
                     = -inf               otherwise

so that reading the label-token argmax, the softmax, or ``generate(max_new_tokens=1)`` gives the
exit answer. Rows that ran every layer keep the model's logits bit for bit unless a full-depth
correction (the classifier's layer-L label bias) is asked for explicitly.
"""

from __future__ import annotations

import torch

from adainfer.runtime.stats import ExitStats


def label_answer_logits(logprobs: torch.Tensor, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, V) logits that answer with given label log-probabilities: ``logprobs[:, k]`` at token
    ``labels[k]``, ``-inf`` elsewhere (V, dtype and device those of ``like``'s last dimension).
    Every engine adapter writes the exit answer in label mode with this (HF: the last position's
    logits; vLLM: the sampled rows)."""
    out = torch.full((logprobs.shape[0], like.shape[-1]), float("-inf"), dtype=like.dtype, device=like.device)
    out.index_copy_(1, labels.to(like.device), logprobs.to(device=like.device, dtype=like.dtype))
    return out


def deliver_answers(stats: ExitStats, logits: torch.Tensor, final_label_bias: torch.Tensor | None) -> torch.Tensor:
    """Complete ``stats``' answers and return the logits to hand back (``logits`` itself when
    nothing changes; modified in place unless it requires grad).

    Args:
        stats: the pass's statistics (exit layers, answers of the rows that stopped early).
        logits: (B, T', V) the model's logits (T' >= 1: the last position is the answer's).
        final_label_bias: (K,) fp32 correction of full-depth label answers, or None.
    """
    device = logits.device
    batch = stats.exit_layers.numel()
    if logits.dim() != 3 or logits.shape[0] != batch:
        return logits  # not one row of logits per batch row (e.g. a custom head): nothing to say
    full = (stats.exit_layers == stats.num_layers).to(device)
    full_rows = torch.nonzero(full).squeeze(1)
    last = logits[:, -1, :]
    labels = stats.label_token_ids
    if labels is None:
        # Full-depth rows, and exits left pending (their last logits are the LM head on the frozen
        # exit state: the logit-lens answer, so the exit needs no second full-vocabulary pass),
        # are answered from the model's own logits: top-1 and its probability exp(max - logsumexp).
        pending = stats.take_pending_rows()
        if pending is not None:
            full_rows = torch.cat([full_rows, pending.to(device)])
        if full_rows.numel():
            if full_rows.numel() == batch:  # every row (a permutation of them): no copy
                full_rows, x = torch.arange(batch, device=device), last
            else:
                x = last.index_select(0, full_rows)
            x = x.detach()
            best, token = x.max(dim=-1)
            prob = torch.exp(best.float() - torch.logsumexp(x.float(), dim=-1))
            stats.set_answers(full_rows, token, prob)
        return logits
    labels_here = labels.to(device)
    if full_rows.numel():
        z = last.index_select(0, full_rows).index_select(1, labels_here).float()
        if final_label_bias is not None:
            z = z + final_label_bias.to(device)
        stats.record_answers(full_rows, torch.log_softmax(z, dim=-1), None)
    rewrite = ~full if final_label_bias is None else torch.ones_like(full)
    rows = torch.nonzero(rewrite).squeeze(1)
    if rows.numel() == 0:
        return logits
    new_last = label_answer_logits(stats.label_logprobs.to(device).index_select(0, rows), labels, logits)
    if logits.requires_grad:  # never an in-place write into a tensor autograd needs
        logits = logits.clone()
    logits[rows, -1, :] = new_last
    return logits
