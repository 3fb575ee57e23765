"""The offline calibration wing: from a task's data to a fitted, budgeted stop classifier.

``features`` runs the unpatched model once and keeps per-layer signals of the last token;
``labelbias`` estimates the per-layer label-bias correction; ``classifier`` is the stop rule
(``StopClassifier``), ``classifier_file`` its JSON file (and a probe's weights) with the checks of
both; ``linear_fit`` fits its decision function (scikit-learn), ``probe`` the per-layer probes, and
``fit`` puts them together and chooses its threshold under a disagreement budget; ``metrics`` and
``evaluate`` score a classifier on a split; ``choices`` names the options. Nothing here imports
the application wing; the runtime is reached only through the ``WallclockFn`` a caller passes in.
"""
