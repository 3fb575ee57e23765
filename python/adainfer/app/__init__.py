"""The application wing: the ``adainfer`` CLI and what it needs around the algorithm.

``cli`` (the commands), ``pipeline`` (the demo and the results table and files), ``tasks`` (prompt
building, the bundled tweet-sentiment task, user task files), ``loading`` (the bundled model and
local model paths, offline), ``plots``.
"""
