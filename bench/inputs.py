"""Real benchmark inputs: the texts of the bundled tweet corpus (``adainfer.app.datasets``)."""

from __future__ import annotations

import csv
import functools


@functools.cache
def bundled_tweets() -> tuple[str, ...]:
    """Every tweet of the bundled corpus, in file order."""
    from adainfer.app.datasets import tweet_csv_path

    with tweet_csv_path().open(encoding="latin-1", newline="") as f:
        return tuple(row["text"] for row in csv.DictReader(f))
