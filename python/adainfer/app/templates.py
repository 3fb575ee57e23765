"""Prompt templates: how the instruction, the demonstrations and the query of a task are written.

A prompt is ``prefix + query(text)`` with ``prefix = instruction + separator + demo_1 + separator +
... + demo_k + separator`` and ``demo_i = query(text_i) + label_word(label_i)``
(:class:`adainfer.app.tasks.RenderedTask` builds it); a chat template writes the same turns through
the tokenizer's chat template instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """How a prompt is written.

    Attributes:
        name: short id used in tables and on the command line.
        instruction: text before the demonstrations ("" for none).
        query: the query with a ``{text}`` field; a demonstration is ``query + label word``.
        separator: between the instruction, the demonstrations and the query. Use ``"\\n"`` rather
            than ``"\\n\\n"``: byte-level BPE splits a blank line differently at the end of a string,
            which breaks prefix sharing (the check in ``features`` falls back, but slower).
        chat: render with the tokenizer's chat template instead: the instruction is the system
            message, each demonstration a user turn (the query) and an assistant turn (the label
            word), and the prompt ends with the assistant's generation prompt.
    """

    name: str
    query: str = "Tweet: {text}\nSentiment:"
    instruction: str = ""
    separator: str = "\n"
    chat: bool = False

    def format_query(self, text: str, label_words: Sequence[str] = ()) -> str:
        words = " or ".join(w.strip() for w in label_words)
        return self.query.replace("{words}", words).replace("{text}", text)

    def format_instruction(self, label_names: Sequence[str], label_words: Sequence[str] = ()) -> str:
        """The instruction with ``{labels}`` (label names) and ``{words}`` (label words) filled in."""
        words = " or ".join(w.strip() for w in label_words)
        return self.instruction.replace("{labels}", ", ".join(label_names)).replace("{words}", words)


# Templates tried by research/prompt_search.py (results in research/prompt_search.md).
TEMPLATES: dict[str, PromptTemplate] = {
    "plain": PromptTemplate(name="plain", query="Tweet: {text}\nSentiment:"),
    "instruct": PromptTemplate(
        name="instruct",
        instruction="Classify the sentiment of each tweet as {words}.",
        query="Tweet: {text}\nSentiment:",
    ),
    "qa": PromptTemplate(
        name="qa",
        instruction="Answer the question about each tweet.",
        query="Tweet: {text}\nQuestion: Is the sentiment of this tweet {words}?\nAnswer:",
    ),
    "chat": PromptTemplate(
        name="chat",
        instruction="Classify the sentiment of each tweet. Answer with one word: {words}.",
        query="Tweet: {text}",
        chat=True,
    ),
    "review": PromptTemplate(name="review", query="Review: {text}\nSentiment:"),
    # The bundled debates, cities and names tasks (wordings compared in adainfer.app.datasets).
    "debate": PromptTemplate(name="debate", query="Statement: {text}\nParty:"),
    "city": PromptTemplate(name="city", query="The city of {text} is in"),
    "name": PromptTemplate(name="name", query="Name: {text}\nGender:"),
    # For user files: the wording names the file's own labels.
    "user": PromptTemplate(
        name="user", instruction="Classify each text as one of: {labels}.", query="Text: {text}\nLabel:"
    ),
}
DEFAULT_TEMPLATE = "plain"


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r} (templates: {', '.join(TEMPLATES)})")
    return TEMPLATES[template]
