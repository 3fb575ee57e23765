"""An lm-evaluation-harness task as a ``ClassificationTask``, so that ``adainfer calibrate`` / ``eval`` and
``lm_eval`` run the same task definition.

    adainfer calibrate --model bundled --task lmeval:NAME --include-path DIR --out-dir DIR
    adainfer calibrate ... --task lmeval:NAME:train,validation     # name the splits to draw from

The task must be a ``multiple_choice`` task (not a multiple-input one) with the same choices on every
doc. Each doc becomes one example:

- the prompt is lm-eval's own zero-shot context of the doc (``task.fewshot_context(doc, 0)``: the
  description + ``doc_to_text``), with lm-eval's rule for trailing whitespace (moved into the
  continuation), so the last prompt token is the one the ``adainfer`` lm-eval model decides on;
- the label words are ``target_delimiter + choice`` (``" negative"``), the label names the choices;
- the gold label is ``doc_to_target`` (an index into the choices, or the choice itself).

Few-shot demonstrations belong in ``doc_to_text`` (lm-eval's ``num_fewshot`` samples its
demonstrations per doc, so they cannot match a calibrated prompt): run ``lm_eval`` with 0 shots.

Which docs: by default the docs of every split the task names (``training_split``,
``validation_split``, ``test_split``) except the one lm-eval evaluates (``test_split``, else
``validation_split``), so that calibration never sees the evaluated docs. The calibration, held-out
and test splits are then drawn from them as for any task (balanced, disjoint, seeded; shrunk with a
warning when a class is too small). ``lmeval:NAME:SPLIT[,SPLIT]`` names the splits explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adainfer.app.splits import balanced_splits
from adainfer.app.tasks import ClassificationTask
from adainfer.app.templates import PromptTemplate

PREFIX = "lmeval:"
# Not used by lm-eval tasks: their prompts and label words come from the task's own definition.
_NOT_FOR_LMEVAL = ("text_column", "label_column", "label_words", "template", "k_shot", "encoding", "min_agreement")


def is_lmeval_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, tuple[str, ...] | None]:
    """``lmeval:NAME`` -> (NAME, None); ``lmeval:NAME:a,b`` -> (NAME, ("a", "b"))."""
    rest = spec[len(PREFIX) :]
    name, _, splits = rest.partition(":")
    if not name:
        raise ValueError(f"task {spec!r}: write lmeval:NAME (an lm-eval task name), e.g. lmeval:my_task")
    chosen = tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None
    return name, chosen


def load_lmeval_task_object(name: str, include_path: str | os.PathLike | None):
    """The lm-eval ``Task`` named ``name`` (tasks of ``include_path`` only when given: indexing
    lm-eval's own hundreds of tasks takes a while, and their datasets are downloaded at run time)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ValueError(
            "lmeval: tasks need lm-evaluation-harness: pip install 'adainfer-kernels[lm-eval]' "
            "(or -r requirements/lmeval.txt)"
        ) from exc
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such folder of lm-eval task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=not include_path)
    if name not in manager.all_tasks:
        where = f"in {include_path}" if include_path else "among lm-eval's tasks (pass --include-path DIR for yours)"
        raise ValueError(f"no lm-eval task {name!r} {where}")
    tasks = manager.load([name])["tasks"]
    if name not in tasks:
        raise ValueError(f"lm-eval task {name!r} is a group of tasks ({', '.join(tasks)}): name one of them")
    return tasks[name]


def _split_docs(task, split: str) -> list[dict]:
    cfg = task.config
    by_role = {cfg.training_split: task.training_docs, cfg.validation_split: task.validation_docs}
    by_role[cfg.test_split] = task.test_docs
    by_role.pop(None, None)
    if split in by_role:
        return list(by_role[split]())
    if split not in task.dataset:
        raise ValueError(f"lm-eval task {cfg.task!r} has no split {split!r} (splits: {', '.join(task.dataset)})")
    docs = task.dataset[split]
    return list(cfg.process_docs(docs) if cfg.process_docs is not None else docs)


def default_splits(task) -> tuple[str, ...]:
    """Every split the task names except the one lm-eval evaluates (test, else validation)."""
    cfg = task.config
    evaluated = cfg.test_split or cfg.validation_split
    named = [cfg.training_split, cfg.validation_split, cfg.test_split]
    out = tuple(dict.fromkeys(s for s in named if s and s != evaluated))
    if not out:
        raise ValueError(
            f"lm-eval task {cfg.task!r} has only the split it evaluates ({evaluated!r}): add a training_split / "
            f"validation_split to its YAML, or calibrate on it explicitly with lmeval:{cfg.task}:{evaluated} "
            "(the calibration docs then overlap what lm_eval evaluates)"
        )
    return out


def _context_and_word(task, doc: dict, choice: str) -> tuple[str, str]:
    """lm-eval's context of ``doc`` and the continuation of ``choice``, with lm-eval's rule that
    trailing whitespace of the context moves into the continuation (``TemplateLM._encode_pair``)."""
    context = task.fewshot_context(doc, 0)
    word = f"{task.config.target_delimiter}{choice}"
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + word


def _gold(task, doc: dict, choices: Sequence[str]) -> int:
    target = task.doc_to_target(doc)
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise ValueError(f"doc_to_target gave {target!r}: one gold label per doc is needed (an index or a choice)")
    if isinstance(target, str):
        if target not in choices:
            raise ValueError(f"doc_to_target gave {target!r}, which is none of the choices {list(choices)}")
        return list(choices).index(target)
    if not 0 <= target < len(choices):
        raise ValueError(f"doc_to_target gave index {target}; the task has {len(choices)} choices")
    return target


def _shared_prefix(texts: Sequence[str]) -> str:
    """The longest common prefix of ``texts`` that ends in a newline (few-shot demonstrations, an
    instruction): the feature pass runs it once. "" when there is none."""
    if len(texts) < 2:
        return ""
    prefix = os.path.commonprefix(list(texts))  # noqa: RUF071 (strings, not paths)
    cut = prefix.rfind("\n")
    prefix = prefix[: cut + 1] if cut >= 0 else ""
    return "" if "{" in prefix else prefix  # PromptTemplate fills {labels}/{words} in its instruction


def classification_task(
    task,
    sizes: dict[str, int],
    seed: int = 0,
    splits: Sequence[str] | None = None,
    name: str | None = None,
) -> ClassificationTask:
    """A ``ClassificationTask`` from an lm-eval ``multiple_choice`` task object (module docstring)."""
    cfg = task.config
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ValueError(
            f"lm-eval task {cfg.task!r} has output_type {task.OUTPUT_TYPE!r}: calibration needs a multiple_choice task"
        )
    if getattr(task, "multiple_input", 0):
        raise ValueError(f"lm-eval task {cfg.task!r} puts its choices in the context (multiple inputs): not supported")
    splits = tuple(splits) if splits else default_splits(task)
    docs = [d for s in splits for d in _split_docs(task, s)]
    if not docs:
        raise ValueError(f"lm-eval task {cfg.task!r} has no docs in split(s) {', '.join(splits)}")
    choices = tuple(task.doc_to_choice(docs[0]))
    if len(set(choices)) != len(choices) or len(choices) < 2:
        raise ValueError(f"lm-eval task {cfg.task!r} has choices {list(choices)}: at least 2 distinct are needed")
    words: tuple[str, ...] | None = None
    by_class: list[list[str]] = [[] for _ in choices]
    seen: set[str] = set()
    for i, doc in enumerate(docs):
        if tuple(task.doc_to_choice(doc)) != choices:
            raise ValueError(
                f"doc {i} of lm-eval task {cfg.task!r} has choices {task.doc_to_choice(doc)}, doc 0 {list(choices)}: "
                "a stop classifier answers over one fixed set of label words"
            )
        pairs = [_context_and_word(task, doc, c) for c in choices]
        context = pairs[0][0]
        doc_words = tuple(w for _, w in pairs)
        if words is None:
            words = doc_words
        elif doc_words != words:
            raise ValueError(
                f"doc {i} of lm-eval task {cfg.task!r} ends its context in other whitespace than doc 0 "
                f"(continuations {list(doc_words)} vs {list(words)}): make doc_to_text end the same way for every doc"
            )
        if not context:
            raise ValueError(f"doc {i} of lm-eval task {cfg.task!r} has an empty context")
        if context in seen:  # the first occurrence wins, as for every task
            continue
        seen.add(context)
        by_class[_gold(task, doc, choices)].append(context)
    prefix = _shared_prefix([t for group in by_class for t in group])
    by_class = [[t[len(prefix) :] for t in group] for group in by_class]
    _, drawn = balanced_splits(by_class, sizes, n_demo_pool=0, seed=seed, allow_shrink=True)
    return ClassificationTask(
        name=name or f"{PREFIX}{cfg.task}",
        label_names=choices,
        label_words=words,
        # The prompt is the doc's context itself: prefix (shared by every doc) + the rest of it.
        template=PromptTemplate(name="lmeval", query="{text}", instruction=prefix, separator=""),
        demonstrations=(),
        splits=drawn,
        seed=seed,
    )


def load_lmeval_task(
    spec: str,
    include_path: str | os.PathLike | None = None,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> ClassificationTask:
    """``lmeval:NAME[:SPLIT,...]`` -> ``ClassificationTask`` (module docstring)."""
    name, splits = parse_spec(spec)
    task = load_lmeval_task_object(name, include_path)
    sizes = dict(sizes or {"calibration": 300, "heldout": 300, "test": 300})
    return classification_task(task, sizes, seed=seed, splits=splits, name=spec)


def load_from_args(args, sizes: dict[str, int], stored: dict | None = None):
    """``load_task_from_args`` of the CLI for an ``lmeval:`` task: (task, the settings to store with a classifier)."""
    stored = stored or {}
    given = [f"--{k.replace('_', '-')}" for k in _NOT_FOR_LMEVAL if getattr(args, k, None) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} do not apply to lm-eval tasks: the prompt and label words come from the task's YAML"
        )
    include_path = getattr(args, "include_path", None) or stored.get("include_path")
    include_path = str(Path(include_path).resolve()) if include_path else None
    seed = args.seed if getattr(args, "seed", None) is not None else stored.get("seed", 0)
    task = load_lmeval_task(args.task, include_path, sizes, seed)
    return task, {"include_path": include_path, "sizes": sizes, "seed": seed}
