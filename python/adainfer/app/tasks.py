"""Classification tasks as in-context-learning prompts, and ``load_task``, which finds one by name or path.

A task is a list of labelled texts, label names, the label *words* the model should answer with,
and a prompt template (:mod:`adainfer.app.templates`). The prompt of an example is

    prefix = instruction + separator + demo_1 + separator + ... + demo_k + separator
    prompt = prefix + query(text)

with ``demo_i = query(text_i) + label_word(label_i)``; the model's answer is the next token after
the prompt, read over the label tokens only. The ``k`` demonstrations are fixed per task (drawn,
balanced, with a seed, from a pool disjoint from every evaluated split: :mod:`adainfer.app.splits`),
so every prompt shares one prefix: the feature pass can run that prefix once and reuse its K/V cache
(:mod:`adainfer.calibration.features`), and the content-free prompts of contextual calibration
(Zhao et al. 2021) are well defined.

Label words must be single tokens *in context*: ``tokenizer(query + word)`` must equal
``tokenizer(query) + [one id]``. :meth:`ClassificationTask.render` tries the word as given and with
its leading space toggled, and raises a clear error otherwise.

Where tasks come from: the bundled corpora (:mod:`adainfer.app.datasets`), the user's files
(:mod:`adainfer.app.user_tasks`) and lm-evaluation-harness tasks (:mod:`adainfer.app.lmeval_task`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adainfer.app.templates import PromptTemplate

CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")  # Zhao et al. 2021, section 5


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's ``label_names``."""

    text: str
    label: int


@dataclass(frozen=True)
class ClassificationTask:
    """A labelled classification task with fixed demonstrations and disjoint balanced splits.

    Attributes:
        name: task id (bundled name or file name).
        label_names: names of the classes; ``Example.label`` indexes them.
        label_words: the words the model answers with, one per class (leading space optional:
            :meth:`render` resolves the form that is a single token).
        template: the prompt template.
        demonstrations: the k fixed, class-balanced demonstrations (from the demo pool).
        splits: ``calibration`` (fit), ``heldout`` (threshold), ``test``; disjoint, balanced.
        seed: the seed every draw used.
    """

    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    template: PromptTemplate
    demonstrations: tuple[Example, ...]
    splits: dict[str, tuple[Example, ...]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"{len(self.label_words)} label words for {len(self.label_names)} labels "
                f"({', '.join(self.label_names)}): give one word per label"
            )
        if len(self.label_names) < 2:
            raise ValueError(f"a classification task needs at least 2 labels, got {list(self.label_names)}")

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r} (splits: {', '.join(self.splits)})")
        return self.splits[name]

    def render(self, tokenizer) -> RenderedTask:
        """Resolve the label words to single tokens of ``tokenizer`` and build the shared prefix."""
        forms, ids = resolve_label_words(tokenizer, self.template, self.label_words)
        return RenderedTask(task=self, tokenizer=tokenizer, label_forms=forms, label_token_ids=ids)


@dataclass(frozen=True)
class RenderedTask:
    """A task bound to a tokenizer: label token ids and the prompt strings.

    ``prompt(text) == prefix + suffix(text)``: the prefix (instruction + demonstrations) is the
    same for every example.
    """

    task: ClassificationTask
    tokenizer: object
    label_forms: tuple[str, ...]
    label_token_ids: tuple[int, ...]

    @property
    def prefix(self) -> str:
        template = self.task.template
        if template.chat:
            return _chat_render(self.tokenizer, self._chat_messages(), generation_prompt=False)
        instruction = template.format_instruction(self.task.label_names, self.task.label_words)
        parts = [instruction] if instruction else []
        parts += [
            template.format_query(d.text, self.task.label_words) + self.label_forms[d.label]
            for d in self.task.demonstrations
        ]
        return "".join(p + template.separator for p in parts)

    def suffix(self, text: str) -> str:
        template = self.task.template
        if not template.chat:
            return template.format_query(text, self.task.label_words)
        prefix = self.prefix
        messages = [
            *self._chat_messages(),
            {"role": "user", "content": template.format_query(text, self.task.label_words)},
        ]
        full = _chat_render(self.tokenizer, messages, generation_prompt=True)
        if not full.startswith(prefix):
            raise ValueError("the chat template does not render the demonstrations as a prefix of the prompt")
        return full[len(prefix) :]

    def prompt(self, text: str) -> str:
        return self.prefix + self.suffix(text)

    def suffixes(self, split: str) -> list[str]:
        return [self.suffix(e.text) for e in self.task.split(split)]

    def prompts(self, split: str) -> list[str]:
        prefix = self.prefix
        return [prefix + s for s in self.suffixes(split)]

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 gold label indices of a split."""
        return np.array([e.label for e in self.task.split(split)], dtype=np.int64)

    def content_free_suffixes(self) -> list[str]:
        """Queries with content-free texts ("N/A", "", "[MASK]"), for contextual calibration."""
        return [self.suffix(t) for t in CONTENT_FREE_TEXTS]

    def _chat_messages(self) -> list[dict[str, str]]:
        template = self.task.template
        instruction = template.format_instruction(self.task.label_names, self.task.label_words)
        messages = [{"role": "system", "content": instruction}] if instruction else []
        for d in self.task.demonstrations:
            messages.append({"role": "user", "content": template.format_query(d.text, self.task.label_words)})
            messages.append({"role": "assistant", "content": self.label_forms[d.label]})
        return messages


def _chat_render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template: use a plain template (e.g. --template instruct)")
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def resolve_label_words(
    tokenizer, template: PromptTemplate, words: Sequence[str]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The form of each label word that the model produces as exactly one token after a query.

    For each word (surrounding spaces ignored) the forms tried are the natural one first, " word"
    after a plain query ("Sentiment: positive") or "word" at the start of a chat assistant turn,
    then the other; a form passes when ``ids(stub + form) == ids(stub) + [t]`` for a stub ending like a prompt
    (after ``template``'s query, or the assistant turn of a chat prompt).

    Returns:
        (forms, token ids), one per word; ids are distinct.

    Raises:
        ValueError: a word is no single token in any form, or two words share a token.
    """
    probe = "I like this."
    if template.chat:
        messages = [{"role": "user", "content": template.format_query(probe)}]
        stub = _chat_render(tokenizer, messages, generation_prompt=True)
    else:
        stub = template.format_query(probe)
    base = _ids(tokenizer, stub)
    forms: list[str] = []
    ids: list[int] = []
    for word in words:
        if not word.strip():
            raise ValueError(f"label word {word!r} is empty")
        bare = word.strip()
        # the natural form first: " word" after "Sentiment:", "word" at the start of a chat turn
        natural, other = (bare, " " + bare) if template.chat else (" " + bare, bare)
        tried = []
        for form in (natural, other):
            full = _ids(tokenizer, stub + form)
            extra = full[len(base) :]
            tried.append((form, [tokenizer.decode([t]) for t in extra]))
            if full[: len(base)] == base and len(extra) == 1:
                forms.append(form)
                ids.append(extra[0])
                break
        else:
            detail = "; ".join(f"{f!r} -> {len(t)} tokens {t}" for f, t in tried)
            raise ValueError(
                f"label word {word!r} is not a single token for this tokenizer after the prompt ({detail}); "
                "choose a shorter or more common word"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(words)} map to the same token ids {ids}: choose distinct words")
    return tuple(forms), tuple(ids)


def load_task(spec: str, **kwargs) -> ClassificationTask:
    """A bundled task by name (:mod:`adainfer.app.datasets`), a user file by path
    (:func:`adainfer.app.user_tasks.load_user_task`), or an lm-evaluation-harness multiple-choice
    task, ``lmeval:NAME`` (:func:`adainfer.app.lmeval_task.load_lmeval_task`: ``include_path``,
    ``sizes`` and ``seed`` only); ``kwargs`` go to the one chosen."""
    # imported here: these modules build on this one's types
    from adainfer.app.datasets import BUNDLED_LOADERS, BUNDLED_TASKS
    from adainfer.app.lmeval_task import is_lmeval_spec, load_lmeval_task
    from adainfer.app.user_tasks import TASK_FILE_KINDS, load_user_task

    if is_lmeval_spec(spec):
        other = sorted(set(kwargs) - {"include_path", "sizes", "seed"})
        if other:
            raise ValueError(
                f"{', '.join(other)} do not apply to lm-eval tasks: "
                "the prompt and label words come from the task's YAML"
            )
        return load_lmeval_task(spec, **kwargs)
    if spec in BUNDLED_TASKS:
        user_only = ("text_column", "label_column", "encoding")
        build = BUNDLED_LOADERS[spec]
        kwargs = {k: v for k, v in kwargs.items() if k not in user_only and not (k == "template" and v is None)}
        return build(**kwargs)
    if Path(spec).suffix.lower() in TASK_FILE_KINDS or Path(spec).exists():
        kwargs.pop("min_confidence", None)
        return load_user_task(spec, **kwargs)
    raise ValueError(
        f"unknown task {spec!r}: use a bundled task ({', '.join(BUNDLED_TASKS)}), a .csv/.jsonl file or lmeval:NAME"
    )
