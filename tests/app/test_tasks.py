"""Tasks: balanced seeded demonstrations and splits, single-token label words, user CSV/JSONL files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from adainfer.app.tasks import (
    TEMPLATES,
    balanced_splits,
    draw_demonstrations,
    load_task,
    load_user_task,
    parse_label_words,
    resolve_label_words,
    tweet_sentiment,
)


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled.tokenizer


def _pools(n=20, k=2):
    return [[f"class{c} text {i}" for i in range(n)] for c in range(k)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 8])
def test_demonstrations_are_balanced_and_seeded(k):
    demos = draw_demonstrations(_pools(), k, seed=3)
    counts = Counter(d.label for d in demos)
    assert len(demos) == k
    assert max(counts.values(), default=0) - min(counts.get(c, 0) for c in (0, 1)) <= 1
    assert demos == draw_demonstrations(_pools(), k, seed=3)
    assert all(d.text.startswith(f"class{d.label}") for d in demos)
    if k >= 4:
        assert demos != draw_demonstrations(_pools(), k, seed=4)


def test_demonstrations_need_a_big_enough_pool():
    with pytest.raises(ValueError, match="the pool has 1"):
        draw_demonstrations(_pools(n=1), 4, seed=0)


def test_splits_are_balanced_disjoint_and_seeded():
    by_class = [[f"neg {i}" for i in range(100)], [f"pos {i}" for i in range(60)]]
    sizes = {"calibration": 20, "heldout": 30, "test": 40}
    pools, splits = balanced_splits(by_class, sizes, n_demo_pool=8, seed=1)
    seen = set()
    for name, n in sizes.items():
        ex = splits[name]
        assert len(ex) == n and Counter(e.label for e in ex) == {0: n // 2, 1: n // 2}
        texts = {e.text for e in ex}
        assert not texts & seen
        seen |= texts
    assert not seen & {t for p in pools for t in p}  # demonstrations never evaluated
    assert balanced_splits(by_class, sizes, 8, seed=1) == (pools, splits)
    with pytest.raises(ValueError, match="smallest class has 60"):
        balanced_splits(by_class, {"test": 200}, 8, seed=1)
    with pytest.warns(UserWarning, match="shrunk"):
        _, small = balanced_splits(by_class, {"calibration": 100, "test": 100}, 8, seed=1, allow_shrink=True)
    assert len(small["calibration"]) + len(small["test"]) <= 2 * 52


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


@pytest.mark.slow
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_renders_single_token_labels(tokenizer, template):
    task = tweet_sentiment(k_shot=2, template=template, sizes={"calibration": 4, "heldout": 2, "test": 2})
    rendered = task.render(tokenizer)
    for text, tok_id in zip(("I hate this", "I love this"), rendered.label_token_ids, strict=True):
        ids = tokenizer(rendered.prompt(text)).input_ids
        assert len(tokenizer(rendered.prompt(text) + rendered.label_forms[0]).input_ids) == len(ids) + 1
        assert isinstance(tok_id, int)
    if template == "chat":
        assert rendered.label_forms == ("negative", "positive")  # the assistant turn has no leading space
        assert rendered.prompt("x").endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_label_words_resolve_leading_space_or_fail_clearly(tokenizer):
    plain = TEMPLATES["plain"]
    forms, ids = resolve_label_words(tokenizer, plain, ["good", " bad"])
    assert forms == (" good", " bad") and len(set(ids)) == 2
    with pytest.raises(ValueError, match="not a single token"):
        resolve_label_words(tokenizer, plain, ["extraordinarily positive", "bad"])
    with pytest.raises(ValueError, match="same token"):
        resolve_label_words(tokenizer, plain, [" good", "good"])


def test_parse_label_words():
    names = ("neg", "pos")
    assert parse_label_words(None, names) == names
    assert parse_label_words(["bad", "good"], names) == ("bad", "good")
    assert parse_label_words(["pos= good", "neg= bad"], names) == (" bad", " good")
    with pytest.raises(ValueError, match="missing"):
        parse_label_words(["pos=good"], names)
    with pytest.raises(ValueError, match="got 3 words for 2 labels"):
        parse_label_words(["a", "b", "c"], names)


def _rows(n=30):
    for i in range(n):
        yield {"review": f"great product number {i}", "stars": "pos"}
        yield {"review": f"awful thing number {i}", "stars": "neg"}


@pytest.mark.slow
def test_user_csv_and_jsonl_files(tmp_path, tokenizer):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("review,stars\n" + "".join(f'"{r["review"]}",{r["stars"]}\n' for r in _rows()))
    jsonl_path = tmp_path / "reviews.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    sizes = {"calibration": 10, "heldout": 10, "test": 10}
    for path in (csv_path, jsonl_path):
        task = load_user_task(
            path, text_column="review", label_column="stars", label_words=["bad", "good"], k_shot=2, sizes=sizes
        )
        assert task.label_names == ("neg", "pos")
        assert Counter(e.label for e in task.split("test")) == {0: 5, 1: 5}
        assert all(("great" in e.text) == (e.label == 1) for e in task.split("calibration"))
        rendered = task.render(tokenizer)
        assert rendered.label_forms == (" bad", " good")
        assert "one of: neg, pos" in rendered.prefix
    via_spec = load_task(str(jsonl_path), text_column="review", label_column="stars", sizes=sizes, k_shot=2)
    assert via_spec.label_words == ("neg", "pos")


def test_user_file_errors(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nhello,a\nworld,b\n")
    with pytest.raises(ValueError, match=r"no label column 'stars' \(columns: text, label\)"):
        load_user_task(path, label_column="stars")
    with pytest.raises(ValueError, match="no text column 'body'"):
        load_user_task(path, text_column="body")
    with pytest.raises(FileNotFoundError):
        load_user_task(tmp_path / "missing.csv")
    bad = tmp_path / "data.parquet"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported task file"):
        load_user_task(bad)
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello,a\nworld,a\n")
    with pytest.raises(ValueError, match="1 distinct label"):
        load_user_task(one)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 ok,a\nna\xefve,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match="pass --encoding"):
        load_user_task(latin)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no-such-task")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_numeric_labels_with_a_blank_cell_stay_as_written(tmp_path, suffix):
    sep = "," if suffix == ".csv" else "\t"
    rows = [f"text {i}{sep}{i % 2}" for i in range(40)] + [f"no label{sep}", f"007{sep}1"]
    path = tmp_path / f"numeric{suffix}"
    path.write_text(f"text{sep}label\n" + "\n".join(rows) + "\n")
    sizes = {"calibration": 4, "heldout": 4, "test": 4}
    with pytest.warns(UserWarning, match="1 row.* blank 'label' label: skipped"):
        task = load_user_task(path, k_shot=2, sizes=sizes)
    assert task.label_names == ("0", "1")  # not "0.0" / "1.0" (pandas' float column)
    assert task.label_words == ("0", "1")
    texts = {e.text for split in task.splits.values() for e in split} | {d.text for d in task.demonstrations}
    assert "no label" not in texts


def test_text_is_read_as_written(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text("text,label\n" + "".join(f"{i:03d},{'ab'[i % 2]}\n" for i in range(40)))
    task = load_user_task(path, k_shot=2, sizes={"calibration": 4, "heldout": 4, "test": 4})
    texts = [e.text for split in task.splits.values() for e in split]
    assert all(len(t) == 3 and t.isdigit() for t in texts), texts  # "007", not 7


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("header.csv", "text,label\n", "has a header row but no examples"),
        ("header.tsv", "text\tlabel\n\n\n", "has a header row but no examples"),
        ("empty.csv", "", "is empty"),
        ("blank.jsonl", "\n  \n", "is empty"),
        ("array.json", "[]\n", "holds no examples"),
    ],
)
def test_files_without_examples_are_refused_clearly(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_user_task(path)


def test_task_file_that_is_a_directory(tmp_path):
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_user_task(tmp_path / "data.csv")


def test_split_sizes_and_demonstrations_must_be_valid():
    by_class = [[f"neg {i}" for i in range(50)], [f"pos {i}" for i in range(50)]]
    with pytest.raises(ValueError, match=r"split 'test' must have a whole number of examples >= 0, got -4"):
        balanced_splits(by_class, {"calibration": 10, "test": -4}, 8, seed=0)
    with pytest.raises(ValueError, match=r"split 'test' of 1 examples is too small for 2 classes"):
        balanced_splits(by_class, {"calibration": 10, "test": 1}, 8, seed=0)
    with pytest.raises(ValueError, match="whole number"):
        balanced_splits(by_class, {"test": 2.5}, 8, seed=0)
    _, empty = balanced_splits(by_class, {"calibration": 10, "test": 0}, 8, seed=0)  # an empty split is allowed
    assert empty["test"] == () and len(empty["calibration"]) == 10
    with pytest.raises(ValueError, match="demonstrations must be an integer >= 0, got -2"):
        draw_demonstrations(_pools(), -2, seed=0)


def test_tweet_label_words_take_label_word_pairs():
    task = tweet_sentiment(label_words=["positive=good", "negative=bad"], sizes={"calibration": 2, "test": 2})
    assert task.label_words == ("bad", "good")
    with pytest.raises(ValueError, match="missing"):
        tweet_sentiment(label_words=["positive=good"], sizes={"calibration": 2})
