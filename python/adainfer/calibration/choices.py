"""The named choices of calibration, defined once: the library validates against these tuples, the
classifier file stores one of each, and the ``adainfer`` CLI offers them as ``choices``.

``auto`` is not a value a fitted classifier holds: it asks the fitting code to pick one (the readout
and method that save more layers on the calibration split, before the held-out split certifies the
chosen rule; the label-bias estimator by the number of labels).
"""

from __future__ import annotations

AUTO = "auto"
READOUTS = ("lens", "probe")  # how a checked layer is decoded: the model's own head, or a per-layer probe
METHODS = ("svm", "logreg", "gap")  # the decision function: LinearSVC, logistic regression, the plain gap
AUTO_METHODS = ("gap", "svm")  # what ``auto`` compares on the fitting split (logreg ~ svm, slower)
TARGETS = ("consistency", "gold")  # what the classifier learns to predict: the full model's answer, or the gold label
VOCAB_MODES = ("labels", "full")  # the exit head reads the task's label tokens, or the whole vocabulary
LABEL_BIAS_ESTIMATORS = ("none", "content-free", "mean", "balanced")
DTYPES = ("float32", "bfloat16")  # the model dtypes the app loads; ``auto``: bf16 where the CPU runs it natively
SPLITS = ("calibration", "heldout", "test")  # a task's splits; the keys of a classifier's info["task"]["sizes"]

READOUT_CHOICES = (AUTO, *READOUTS)
METHOD_CHOICES = (AUTO, *METHODS)
DTYPE_CHOICES = (AUTO, *DTYPES)
LABEL_BIAS_CHOICES = (AUTO, *LABEL_BIAS_ESTIMATORS)
