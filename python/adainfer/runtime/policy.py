"""Exit policies: what the exit head decodes at a checked layer and which rows stop there.

``ClassifierPolicy`` is AdaInfer: a fitted stop classifier whose linear score is computed inside the
fused exit head. ``ForcedExits`` stops given rows at given layers (tests and benchmarks), and
``NeverExit`` runs every check but stops nothing (it proves the checks change no result).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from adainfer_kernels.head import NEVER_STOP, ExitSignals, ReadoutHead, StopRule


class ExitPolicy(Protocol):
    """What the layer loop asks a policy. Attributes:

    ``needs_signals``: False when ``should_stop`` decides without the exit head's signals (then the
    loop decodes only the rows that stop, for their answers). ``label_token_ids``: (K,) int64 token
    ids when the answers are over a task's label tokens (None: the full vocabulary).
    """

    needs_signals: bool
    label_token_ids: torch.Tensor | None

    def layers_to_check(self, num_layers: int) -> frozenset[int]:
        """Layers (1 <= k < L) after which this policy wants a check."""

    def head_and_rule(self, layer: int, base: ReadoutHead) -> tuple[ReadoutHead, StopRule | None]:
        """The readout head (vocabulary subset, per-layer logit bias) and stop rule used at ``layer``."""

    def should_stop(self, layer: int, signals: ExitSignals | None, rows: torch.Tensor) -> torch.Tensor:
        """(A,) bool: which of the checked rows (original batch ids ``rows``) stop at ``layer``."""

    def final_label_bias(self, num_layers: int) -> torch.Tensor | None:
        """(K,) fp32 label-logit correction of the full model's answer, or None (used only when
        ``AdaInferConfig(correct_full_depth=True)``)."""

    # Optional (the loop calls it when a policy defines it):
    #     begin_pass(batch_size: int) -> None
    # at the start of every forward pass (in generate: every step), before any layer runs, with the
    # pass's batch size B. A policy built for one batch (ForcedExits) refuses another one there.


class ClassifierPolicy:
    """AdaInfer's rule: stop a row at layer k when the classifier's score there is positive.

    ``classifier`` is duck-typed (``adainfer.calibration.classifier.StopClassifier`` fits it): it
    provides ``stop_rule(layer) -> StopRule`` with the threshold and any layer term folded into the
    offset, ``label_bias_at(layer) -> Tensor | None`` (per-layer label bias), ``vocab_subset``
    ((K,) token ids, or None for the full vocabulary) and ``checked_layers`` (the layers whose
    check can stop a row).
    """

    needs_signals = True

    def __init__(self, classifier, layers: frozenset[int] | None = None) -> None:
        self.classifier = classifier
        self._layers = layers
        ids = classifier.vocab_subset
        self.label_token_ids = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)
        # layer -> (the base head it was built from, head, stop rule): rebuilt when the base changes (a
        # model whose head is offloaded hands a freshly loaded base to every check)
        self._cache: dict[int, tuple[ReadoutHead, ReadoutHead, StopRule | None]] = {}
        self._subset: torch.Tensor | None = None

    def layers_to_check(self, num_layers: int) -> frozenset[int]:
        if self._layers is not None:
            return self._layers
        return frozenset(int(k) for k in self.classifier.checked_layers)

    def head_and_rule(self, layer: int, base: ReadoutHead) -> tuple[ReadoutHead, StopRule | None]:
        cached = self._cache.get(layer)
        if cached is None or cached[0] is not base:
            if getattr(self.classifier, "readout", "lens") == "probe":
                self._cache[layer] = cached = (base, self._probe_head(layer, base), self.classifier.stop_rule(layer))
                return cached[1], cached[2]
            device = base.weight.device
            if self.classifier.vocab_subset is not None and (self._subset is None or self._subset.device != device):
                # One subset tensor for every layer: the exit head caches its packed subset weight per tensor.
                self._subset = torch.as_tensor(self.classifier.vocab_subset, dtype=torch.int64, device=device)
            bias = self.classifier.label_bias_at(layer)
            head = dataclasses.replace(
                base,
                vocab_subset=self._subset,
                logit_bias=None if bias is None else torch.as_tensor(bias, dtype=torch.float32, device=device),
            )
            self._cache[layer] = cached = (base, head, self.classifier.stop_rule(layer))
        return cached[1], cached[2]

    def _probe_head(self, layer: int, base: ReadoutHead) -> ReadoutHead:
        """Layer ``layer``'s probe as a readout head: its (K, d) weight in fp32 on the head's
        device, no norm (the probe reads the raw hidden state), subset = its K rows, and its bias
        as the logit bias (fp32).

        The weight stays fp32 whatever the model's dtype (the rows are cast to it: ``exit_signals``),
        as the simulation reads it: a probe's folded standardisation makes W h and its bias large
        and of opposite signs, so a bf16 copy of W (8 bits of mantissa) moves the probe's logits
        (under the bundled model in bf16 it changed 1 exit layer in 96 test prompts against the
        simulation; it costs a (rows, d) cast of a few rows)."""
        weight, bias = self.classifier.probe_layer(layer)
        device = base.weight.device
        return ReadoutHead(
            weight=torch.as_tensor(weight, dtype=torch.float32).to(device=device),
            norm="none",
            vocab_subset=torch.arange(weight.shape[0], device=device),
            logit_bias=torch.as_tensor(bias, dtype=torch.float32).to(device),
        )

    def should_stop(self, layer: int, signals: ExitSignals | None, rows: torch.Tensor) -> torch.Tensor:
        # NaN scores (non-finite hidden states) compare False: such rows never stop early.
        return signals.score > 0

    def final_label_bias(self, num_layers: int) -> torch.Tensor | None:
        if self.label_token_ids is None:
            return None
        return self.classifier.label_bias_at(num_layers)


@dataclasses.dataclass(frozen=True)
class _FixedClassifier:
    """The classifier protocol for one fixed stop rule at every layer."""

    rule: StopRule
    checked_layers: frozenset[int]
    vocab_subset: object = None

    def stop_rule(self, layer: int) -> StopRule:
        return self.rule

    def label_bias_at(self, layer: int) -> None:
        return None


class StopRulePolicy(ClassifierPolicy):
    """One fixed stop rule (and optional label tokens) at every checked layer."""

    def __init__(self, stop_rule: StopRule, layers, label_token_ids=None) -> None:
        super().__init__(_FixedClassifier(stop_rule, frozenset(layers), label_token_ids))


class NeverExit(StopRulePolicy):
    """Runs the full-vocabulary exit head at the given layers but never stops a row."""

    def __init__(self, layers: frozenset[int]) -> None:
        super().__init__(NEVER_STOP, layers)


class ForcedExits:
    """Stops original batch row r at layer ``exit_layers[r]`` (values >= L mean never).

    Args:
        exit_layers: (B,) integer per-row exit layer, counted from 1, applied at every forward call
            (in generation: at every step). A batch of another size than B is refused at its first
            layer.
    """

    needs_signals = False  # the rows are known in advance: only the stopping rows are decoded
    label_token_ids = None

    def __init__(self, exit_layers) -> None:
        values = torch.as_tensor(exit_layers)
        if values.dim() != 1:
            raise ValueError(f"exit_layers must be 1-D (one exit layer per batch row), got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"exit_layers must be integers (layers are counted from 1), got {values.dtype}")
        self.exit_layers = values.to(torch.int64)
        if self.exit_layers.numel() and int(self.exit_layers.min()) < 1:
            bad = self.exit_layers[self.exit_layers < 1][:5].tolist()
            raise ValueError(f"exit layers are counted from 1 (use a value >= L for 'never'); got {bad}")

    def layers_to_check(self, num_layers: int) -> frozenset[int]:
        return frozenset(int(k) for k in self.exit_layers.unique().tolist() if 1 <= k < num_layers)

    def head_and_rule(self, layer: int, base: ReadoutHead) -> tuple[ReadoutHead, StopRule | None]:
        return base, None

    def final_label_bias(self, num_layers: int) -> None:
        return None

    def begin_pass(self, batch_size: int) -> None:
        if batch_size != self.exit_layers.numel():
            raise ValueError(
                f"ForcedExits covers {self.exit_layers.numel()} rows but the batch has {batch_size}: "
                "give one exit layer per batch row"
            )

    def should_stop(self, layer: int, signals: ExitSignals | None, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() and int(rows.max()) >= self.exit_layers.numel():
            raise ValueError(
                f"ForcedExits covers {self.exit_layers.numel()} rows but the batch has row {int(rows.max())}"
            )
        return self.exit_layers.to(rows.device)[rows] == layer
