"""The stop classifier: a linear decision function over logit-lens features, kernel-ready.

After layer k, with the exit head's top-1 probability p1 and gap g = p1 - p2 of the last token,

    d_k = w_top_prob * p1 + w_gap * g + w_layer * k + intercept        (the fitted function)
    stop  iff  d_k - threshold > 0                                        (the budgeted threshold)

so each checked layer gets a ``StopRule(w_top_prob, w_gap, offset_k)`` with
``offset_k = intercept + w_layer * k - threshold``: the kernel's ``score > 0`` is the decision.
Layers before ``min_layer`` are not checked; layer L always stops. In label mode the exit head
decodes onto the task's label tokens with the per-layer label bias ``label_bias_at(k)`` (K,) added
to their logits, so p1 and g are the *corrected* label probabilities the classifier was fitted on.

Readouts (``readout``): ``lens`` decodes through the model's own final norm and LM head (the
paper); ``probe`` decodes layer k through a per-layer linear probe of the hidden state
(:mod:`adainfer.calibration.probe`), whose (K, d) weights go into the same fused exit head.

The weights are fitted by :mod:`adainfer.calibration.linear_fit` (through
:mod:`adainfer.calibration.fit`). On disk (:mod:`adainfer.calibration.classifier_file`): JSON with
the model's identity, a probe's weights beside it; ``save`` / ``load`` / ``to_dict`` /
``from_dict`` delegate there, every classifier is validated when built, and
``check_compatible(model)`` refuses another model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adainfer.calibration import classifier_file
from adainfer.calibration.classifier_file import ClassifierFileError
from adainfer.calibration.probe import ProbeHeads
from adainfer_kernels.head import ALWAYS_STOP, NEVER_STOP, StopRule

# ClassifierFileError is defined beside the checks that raise it and re-exported here, with the
# class: ``from adainfer.calibration.classifier import ClassifierFileError``.
__all__ = ["ClassifierFileError", "ModelIdentity", "StopClassifier"]


@dataclass(frozen=True)
class ModelIdentity:
    """What a classifier was fitted for: it is valid only on a model with the same values."""

    model_type: str
    num_hidden_layers: int
    vocab_size: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> ModelIdentity:
        return cls(
            model_type=str(config.model_type),
            num_hidden_layers=int(config.num_hidden_layers),
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
        )

    @classmethod
    def from_model(cls, model) -> ModelIdentity:
        return cls.from_config(model.config)

    def describe(self) -> str:
        return (
            f"a {self.num_hidden_layers}-layer {self.model_type} model with hidden size {self.hidden_size} "
            f"and vocab {self.vocab_size}"
        )


@dataclass(frozen=True)
class StopClassifier:
    """A fitted stop rule for one model (and, in label mode, one task's label tokens).

    Attributes:
        identity: the model it was fitted for.
        method: ``svm`` | ``logreg`` | ``gap``.
        target: what "settled" meant when fitting: ``consistency`` (the layer's answer equals the
            full model's) or ``gold`` (equals the gold label).
        vocab_mode: ``labels`` (exit head over the label tokens) or ``full`` (whole vocabulary).
        w_top_prob, w_gap, w_layer, intercept: the raw-feature decision function d (see module).
        threshold: stop iff d > threshold; None: never stop before layer L (no checks at all).
        min_layer: first checked layer (1-based); layers min_layer..L-1 are checked.
        label_token_ids: (K,) label token ids (label mode: the exit head's vocab subset).
        label_words: the K label words as they appear in prompts.
        label_bias: (L, K) per-layer additive label-logit bias, or None (no correction).
        label_bias_estimator: how ``label_bias`` was estimated (``none`` when absent).
        info: free-form facts (task, budget, held-out figures); saved, not interpreted.
        readout: ``lens`` (the model's final norm + LM head over the label tokens, with the label
            bias) or ``probe`` (layer k's linear probe; label mode only; layer L is the model's own).
        probe: the ``ProbeHeads`` when ``readout == "probe"``.
    """

    identity: ModelIdentity
    method: str
    target: str
    vocab_mode: str
    w_top_prob: float
    w_gap: float
    w_layer: float
    intercept: float
    threshold: float | None
    min_layer: int
    label_token_ids: tuple[int, ...] | None = None
    label_words: tuple[str, ...] | None = None
    label_bias: tuple[tuple[float, ...], ...] | None = None
    label_bias_estimator: str = "none"
    info: dict = field(default_factory=dict, compare=False)
    readout: str = "lens"
    probe: ProbeHeads | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        classifier_file.validate(self)

    # ---------------------------------------------------------------- what the runtime needs
    @property
    def n_layers(self) -> int:
        return self.identity.num_hidden_layers

    @property
    def features(self) -> tuple[str, ...]:
        return ("top_prob", "gap", "layer") if self.w_layer != 0.0 else ("top_prob", "gap")

    @property
    def checked_layers(self) -> tuple[int, ...]:
        """Layers whose exit check can stop a row (empty when the threshold is None)."""
        if self.threshold is None:
            return ()
        return tuple(range(self.min_layer, self.n_layers))

    def stop_rule(self, layer: int) -> StopRule:
        """The kernel's ``StopRule`` after ``layer`` (1-based): stop iff score > 0.

        Layer L always stops; a layer that is not checked never does.
        """
        self._check_layer(layer)
        if layer == self.n_layers:
            return ALWAYS_STOP
        if layer not in self.checked_layers:
            return NEVER_STOP
        offset = self.intercept + self.w_layer * layer - self.threshold
        return StopRule(w_top_prob=float(self.w_top_prob), w_gap=float(self.w_gap), offset=float(offset))

    def label_bias_at(self, layer: int) -> torch.Tensor | None:
        """(K,) fp32 label-logit bias of ``layer`` for the exit head, or None."""
        self._check_layer(layer)
        if self.label_bias is None:
            return None
        return torch.tensor(self.label_bias[layer - 1], dtype=torch.float32)

    @property
    def vocab_subset(self) -> torch.Tensor | None:
        """(K,) int64 label token ids in label mode, None in full-vocabulary mode."""
        if self.vocab_mode != "labels":
            return None
        return torch.tensor(self.label_token_ids, dtype=torch.int64)

    def check_compatible(self, model) -> None:
        """Raise ValueError when ``model`` is not the kind of model this classifier was fitted for."""
        have = ModelIdentity.from_model(model)
        if have != self.identity:
            diffs = [
                f"{k} {getattr(self.identity, k)!r} vs {getattr(have, k)!r}"
                for k in ("model_type", "num_hidden_layers", "vocab_size", "hidden_size")
                if getattr(self.identity, k) != getattr(have, k)
            ]
            raise ValueError(
                f"classifier was fitted for {self.identity.describe()}; this model is {have.describe()} "
                f"({'; '.join(diffs)}): calibrate a classifier for this model (`adainfer calibrate`)"
            )

    # ---------------------------------------------------------------- numpy evaluation
    def decision(self, top_prob: np.ndarray, gap: np.ndarray, layer: np.ndarray | int) -> np.ndarray:
        """d = w_top_prob p1 + w_gap g + w_layer k + intercept (before the threshold)."""
        return (
            self.w_top_prob * np.asarray(top_prob, dtype=np.float64)
            + self.w_gap * np.asarray(gap, dtype=np.float64)
            + self.w_layer * np.asarray(layer, dtype=np.float64)
            + self.intercept
        )

    def with_threshold(self, threshold: float | None, min_layer: int | None = None, **info) -> StopClassifier:
        """A copy with another threshold (and first checked layer)."""
        return dataclasses.replace(
            self,
            threshold=None if threshold is None else float(threshold),
            min_layer=self.min_layer if min_layer is None else int(min_layer),
            info={**self.info, **info},
        )

    def probe_layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(W (K, d), b (K,)) float32 of layer ``layer``'s probe (1 <= layer < L)."""
        if self.probe is None:
            raise ValueError("this classifier decodes with the logit lens: it has no probes")
        if not 1 <= int(layer) < self.n_layers:
            raise ValueError(f"probes exist for layers 1..{self.n_layers - 1}, not {layer}")
        return self.probe.weight[layer - 1], self.probe.bias[layer - 1]

    def _check_layer(self, layer: int) -> None:
        if not 1 <= int(layer) <= self.n_layers:
            raise ValueError(f"layer {layer} is out of range 1..{self.n_layers}")

    # ---------------------------------------------------------------- on disk (classifier_file)
    def to_dict(self) -> dict:
        """The JSON object of this classifier (the format of :mod:`adainfer.calibration.classifier_file`)."""
        return classifier_file.to_dict(self)

    def save(self, path: str | Path) -> None:
        """Write the JSON file (and, for a probe classifier, its weights beside it); the file's
        folder is created when missing."""
        classifier_file.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> StopClassifier:
        """Read a classifier file, validating every field (ClassifierFileError naming ``path``)."""
        path = Path(path)
        data = classifier_file.read_json(path)
        try:
            return cls.from_dict(data, folder=path.parent)
        except ClassifierFileError as exc:
            raise ClassifierFileError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict, folder: str | Path | None = None) -> StopClassifier:
        """Build from ``to_dict`` output, validating every field (ClassifierFileError otherwise).

        ``folder``: where a probe classifier's weight file lies (``load`` passes the JSON's folder).
        """
        fields = classifier_file.fields_from_dict(data, folder)
        return cls(identity=ModelIdentity(**fields.pop("identity")), **fields)
