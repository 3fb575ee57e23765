"""Tasks from user files (CSV / TSV / JSONL / JSON) and label words from the command line."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from adainfer.app.tasks import load_task
from adainfer.app.user_tasks import load_user_task, parse_label_words


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled.tokenizer


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
