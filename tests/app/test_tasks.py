"""Tasks rendered for a tokenizer: single-token label words and every template's prompts."""

from __future__ import annotations

import pytest
from adainfer.app.datasets import tweet_sentiment
from adainfer.app.tasks import resolve_label_words
from adainfer.app.templates import TEMPLATES


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return bundled.tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_renders_single_token_labels(tokenizer, template):
    task = tweet_sentiment(k_shot=2, template=template, sizes={"calibration": 4, "heldout": 2, "test": 2})
    rendered = task.render(tokenizer)
    assert len(rendered.label_forms) == len(rendered.label_token_ids) == len(set(rendered.label_token_ids)) == 2
    for text in ("I hate this", "I love this"):
        ids = tokenizer(rendered.prompt(text)).input_ids
        # every label word is one token after the prompt, and that token is its label token id
        for form, tok_id in zip(rendered.label_forms, rendered.label_token_ids, strict=True):
            assert isinstance(tok_id, int)
            assert tokenizer(rendered.prompt(text) + form).input_ids == [*ids, tok_id], (template, form)
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
