"""``ExitStats``: what one forward pass of a patched model did, row by row.

Filled by the layer loop (exit layers, work done, the answers of the rows that stopped early) and
completed by ``deliver_answers`` (the answers of the rows that ran every layer). Exits decided
without the exit head's signals keep their full-vocabulary answers *pending* (rows, last hidden
state, readout head): decoded at most once, through ``decode.exit_signals``, only if they are read
before the model's own logits answer them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adainfer.runtime.decode import exit_signals
from adainfer.runtime.placement import to_device
from adainfer_kernels.head import ExitSignals, ReadoutHead


@dataclass
class ExitStats:
    """What one forward call did.

    Attributes:
        exit_layers: (B,) int64 layers run per row (L for rows that never exited early).
        num_layers: L.
        rows_checked: exit-head rows evaluated, summed over checks.
        check_seconds: wall time spent in exit checks (exit head + decision).
        layer_rows: decoder-layer rows actually computed, summed over layers (B * L without exits
            in compact mode; always B * L in mask mode).
        mode: "compact" or "mask".
        label_token_ids: (K,) int64 label token ids when the policy answers over a task's labels
            (a classifier in label mode), else None (answers over the full vocabulary).
        answer_token: (B,) int64 vocabulary id of each row's answer, -1 where not known: at an exit,
            the exit head's answer; at full depth, the model's own (from the returned logits, so
            known only when the ``*ForCausalLM`` forward ran, not the bare decoder). A policy that
            decides without the exit head's signals (``ForcedExits``) leaves the full-vocabulary
            answers of its exits *pending*: they come from the model's own last-position logits
            (the LM head on the frozen state: the same logit-lens answer, decoded once instead of a
            second full-vocabulary pass per exit event), or from the exit head on the first read
            of ``answer_token`` / ``answer_prob`` when only the bare decoder ran.
        answer_prob: (B,) fp32 probability of that answer (over the label tokens in label mode).
        answer_label: (B,) int64 label index (0..K-1) of the answer in label mode, -1 where not known;
            None without labels.
        label_logprobs: (B, K) fp32 log-probabilities of the labels behind each answer (label mode).
    """

    exit_layers: torch.Tensor
    num_layers: int
    rows_checked: int = 0
    check_seconds: float = 0.0
    layer_rows: int = 0
    mode: str = "compact"
    label_token_ids: torch.Tensor | None = None
    _answer_token: torch.Tensor | None = field(default=None, repr=False)
    _answer_prob: torch.Tensor | None = field(default=None, repr=False)
    answer_label: torch.Tensor | None = None
    label_logprobs: torch.Tensor | None = None
    # (rows, last hidden (S, d), head) of exits decided without signals, answers not decoded yet
    _pending: list[tuple[torch.Tensor, torch.Tensor, ReadoutHead]] = field(default_factory=list, repr=False)

    @property
    def answer_token(self) -> torch.Tensor:
        self._resolve_pending()
        return self._answer_token

    @property
    def answer_prob(self) -> torch.Tensor:
        self._resolve_pending()
        return self._answer_prob

    def defer_answers(self, rows: torch.Tensor, last: torch.Tensor, head: ReadoutHead) -> None:
        """Leave the full-vocabulary answers of ``rows`` (original ids; last hidden (S, d)) pending."""
        self._pending.append((rows, last, head))

    def take_pending_rows(self) -> torch.Tensor | None:
        """Original ids of the rows whose answers are pending (now dropped: the caller answers
        them from the model's own logits), or None."""
        if not self._pending:
            return None
        rows = torch.cat([to_device(r, self.exit_layers.device) for r, _, _ in self._pending])
        self._pending = []
        return rows

    def set_answers(self, rows: torch.Tensor, token: torch.Tensor, prob: torch.Tensor) -> None:
        """Full-vocabulary answers of ``rows`` (original ids): token ids and their probabilities."""
        self._resolve_pending()
        rows = to_device(rows, self._answer_token.device)
        self._answer_token.index_copy_(0, rows, to_device(token, rows.device))
        self._answer_prob.index_copy_(0, rows, to_device(prob.float(), rows.device))

    def _resolve_pending(self) -> None:
        pending, self._pending = self._pending, []
        for rows, last, head in pending:
            with torch.no_grad():
                signals = exit_signals(last, head, None, self.exit_layers.device)
            self.record_answers(rows, None, signals)

    @classmethod
    def start(cls, batch: int, num_layers: int, mode: str, label_token_ids, device) -> ExitStats:
        """The stats of a pass over ``batch`` rows before any layer ran: no exits, answers unknown."""
        stats = cls(
            exit_layers=torch.full((batch,), num_layers, dtype=torch.int64, device=device),
            num_layers=num_layers,
            mode=mode,
            _answer_token=torch.full((batch,), -1, dtype=torch.int64, device=device),
            _answer_prob=torch.full((batch,), float("nan"), device=device),
        )
        if label_token_ids is not None:
            # a fresh copy: the policy's tensor may have been made under inference_mode, and this
            # call may need autograd (indices get saved for backward when answers are delivered)
            stats.label_token_ids = label_token_ids.to(device).clone()
            stats.answer_label = torch.full((batch,), -1, dtype=torch.int64, device=device)
            stats.label_logprobs = torch.full((batch, label_token_ids.numel()), float("nan"), device=device)
        return stats

    def record_answers(self, rows: torch.Tensor, logprobs: torch.Tensor | None, signals: ExitSignals | None) -> None:
        """Answers of ``rows`` (original ids): from (S, K) label log-probabilities in label mode,
        else from the exit head's full-vocabulary signals."""
        device = self.exit_layers.device
        rows = to_device(rows, device)
        if self.label_token_ids is not None:
            logprobs = to_device(logprobs.float(), device)
            best, label = logprobs.max(dim=-1)  # ties: the lower label index, as the kernel
            self.label_logprobs.index_copy_(0, rows, logprobs)
            self.answer_label.index_copy_(0, rows, label)
            self._answer_token.index_copy_(0, rows, self.label_token_ids[label])
            self._answer_prob.index_copy_(0, rows, best.exp())
        else:
            self._answer_token.index_copy_(0, rows, to_device(signals.argmax, device))
            self._answer_prob.index_copy_(0, rows, to_device(signals.top_prob, device))

    @property
    def batch_size(self) -> int:
        return self.exit_layers.numel()

    @property
    def layers_saved_fraction(self) -> float:
        """1 - (layers run per row, averaged) / L: the paper's layer pruning ratio for this call."""
        if self.batch_size == 0:
            return 0.0
        return 1.0 - float(self.exit_layers.float().mean()) / self.num_layers
