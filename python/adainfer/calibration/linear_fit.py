"""Fitting the stop classifier's decision function d(x) = w . x + b with scikit-learn.

``svm`` = ``LinearSVC(class_weight="balanced")`` as in the paper, ``logreg`` =
``LogisticRegression(class_weight="balanced")``, both on standardised features with the
standardisation folded back into raw-feature weights; ``gap`` = the plain baseline d = g.
:mod:`adainfer.calibration.fit` turns the result into a ``StopClassifier`` and chooses its threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adainfer.calibration.choices import METHODS


@dataclass(frozen=True)
class LinearFit:
    """Raw-feature weights (f,) and intercept of a fitted decision function d = w . x + b."""

    weights: np.ndarray
    intercept: float


def fit_linear(
    x: np.ndarray, y: np.ndarray, method: str, *, gap_column: int = 1, c: float = 1.0, seed: int = 0
) -> LinearFit:
    """Fit d(x) = w . x + b, positive for rows whose answer is settled (``y`` True).

    Args:
        x: (n, f) raw features (top_prob, gap[, layer]).
        y: (n,) bool, True where the row's answer already equals the target.
        method: ``svm`` (LinearSVC, balanced classes), ``logreg`` (balanced), or ``gap``
            (d = gap, nothing fitted).
        gap_column: the column of ``x`` holding the gap (for ``gap``).
        c: inverse regularisation strength.

    Standardisation x' = (x - mu) / sigma is folded back: w = w' / sigma, b = b' - sum(w' mu / sigma).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    if method == "gap":
        w = np.zeros(x.shape[1])
        w[gap_column] = 1.0
        return LinearFit(weights=w, intercept=0.0)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
    if y.all() or not y.any():
        raise ValueError(
            f"every training row is {'settled' if y.all() else 'unsettled'}: nothing to separate "
            "(use more or more varied calibration examples)"
        )
    keep = np.isfinite(x).all(axis=1)
    x, y = x[keep], y[keep]
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    sigma[sigma == 0] = 1.0
    xs = (x - mu) / sigma
    if method == "svm":
        from sklearn.svm import LinearSVC

        model = LinearSVC(C=c, class_weight="balanced", dual="auto", max_iter=20000, random_state=seed)
    else:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
    model.fit(xs, y)
    w_std = model.coef_[0].astype(np.float64)
    b_std = float(model.intercept_[0])
    w = w_std / sigma
    b = b_std - float(np.sum(w_std * mu / sigma))
    return LinearFit(weights=w, intercept=b)
