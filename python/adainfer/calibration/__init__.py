"""The offline calibration wing: from a task's data to a fitted, budgeted stop classifier.

``features`` runs the unpatched model once and keeps per-layer signals of the last token;
``labelbias`` estimates the per-layer label-bias correction; ``classifier`` is the stop rule
(``StopClassifier``, JSON on disk); ``fit`` fits it and chooses its threshold under a disagreement
budget; ``metrics`` and ``evaluate`` score a classifier on a split. Nothing here imports the
application wing; the runtime is reached only through the ``WallclockFn`` a caller passes in.
"""
