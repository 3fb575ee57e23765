"""The bundled tasks: the tweet corpus, balanced, deterministic, label words."""

from __future__ import annotations

from collections import Counter

import pytest
from adainfer.app.datasets import tweet_sentiment


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
