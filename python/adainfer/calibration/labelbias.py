"""Per-layer label-bias correction ("Calibrate Before Use", Zhao et al. 2021), estimated per layer.

A small model in context puts a strong prior on some label words, and the logit lens at layer k
has its own prior. With raw label logits z_ik (K,) at layer k, the corrected answer is

    pred_ik = argmax_c (z_ikc + b_kc),     b_k = -log q_k   (q_k a distribution over the K labels)

i.e. dividing the label probabilities by the model's prior q_k, as the diagonal W of contextual
calibration does. The same b_k is applied whichever layer a row stops at, and b_L to the full
model's own answer, so early exit is compared against an equally corrected full model. Estimators
of q_k (all label-free: none uses the gold labels):

* ``content-free`` (Zhao et al.): q_k = mean over the content-free prompts ("N/A", "", "[MASK]")
  of softmax(z_k) for those prompts.
* ``mean`` (batch calibration, Zhou et al. 2024): q_k = mean over the calibration prompts of
  softmax(z_ik) -- the model's average belief on real inputs of this task.
* ``balanced`` (two labels): the shift that makes the median corrected margin zero on the
  calibration prompts, so the corrected answers split the calibration set in half.
* ``none``: b = 0.

On the bundled tweet task ``balanced`` gave the best final-layer accuracy in every unanimous-label
configuration of the prompt search, then ``mean``, then ``content-free``
(research/prompt_search.md); ``auto`` picks ``balanced`` for two labels, else ``mean``.

Each bias is returned as an (L, K) float64 array with zero mean over K (a softmax is unchanged by a
constant shift).
"""

from __future__ import annotations

import numpy as np

from adainfer.calibration.choices import LABEL_BIAS_ESTIMATORS
from adainfer.calibration.features import LayerFeatures, label_probs


def resolve_label_bias_estimator(method: str, n_labels: int) -> str:
    """``auto`` -> ``balanced`` for two labels (best on the bundled task: research/prompt_search.md),
    else ``mean``."""
    if method == "auto":
        return "balanced" if n_labels == 2 else "mean"
    if method not in LABEL_BIAS_ESTIMATORS:
        raise ValueError(f"unknown label-bias method {method!r} (methods: auto, {', '.join(LABEL_BIAS_ESTIMATORS)})")
    return method


def _centre(bias: np.ndarray) -> np.ndarray:
    return bias - bias.mean(axis=-1, keepdims=True)


def estimate_label_bias(
    method: str,
    calibration: LayerFeatures,
    content_free: LayerFeatures | None = None,
) -> np.ndarray | None:
    """The per-layer label bias b (L, K) of ``method``, or None for ``"none"``.

    Args:
        method: one of ``LABEL_BIAS_ESTIMATORS``.
        calibration: features of the calibration prompts (``mean``, ``balanced``).
        content_free: features of the content-free prompts (``content-free``).
    """
    method = resolve_label_bias_estimator(method, calibration.n_labels)
    if method == "none":
        return None
    if method == "content-free":
        if content_free is None:
            raise ValueError("the content-free estimator needs the features of the content-free prompts")
        q = label_probs(content_free).mean(axis=0)
    elif method == "mean":
        q = label_probs(calibration).mean(axis=0)
    else:  # balanced
        if calibration.n_labels != 2:
            raise ValueError(f"the balanced estimator needs 2 labels; this task has {calibration.n_labels}")
        z = calibration.label_logits.astype(np.float64)
        med = np.median(z[..., 1] - z[..., 0], axis=0)  # (L,)
        return _centre(np.stack([np.zeros_like(med), -med], axis=-1))
    return _centre(-np.log(np.clip(q, 1e-30, None)))
