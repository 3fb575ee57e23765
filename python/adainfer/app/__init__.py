"""The application wing: the ``adainfer`` CLI and what it needs around the algorithm.

``cli`` (parses and dispatches), ``cli_args`` (argument types, deprecated spellings), ``workflow``
(``calibrate`` / ``evaluate`` from Python, and the calibrate / eval commands), ``pipeline`` (the
demo, the results table and files), ``tasks`` (tasks as prompts, ``load_task``), ``templates``,
``splits``, ``datasets`` (the bundled corpora), ``user_tasks`` (task files), ``lmeval_task`` /
``lmeval_model`` (lm-evaluation-harness), ``classify``, ``loading`` (the bundled model and local
model paths, offline), ``plots``.
"""
