"""Argument types of the ``adainfer`` command line, and its deprecated option spellings.

Every value is checked when it is parsed, before any work: argparse reports a bad one as
``adainfer <cmd>: error: argument --x: <problem>`` (exit 2). Defaults given as strings are parsed
by the same types. An old option spelling is kept for one release as a hidden alias
(:func:`add_deprecated_alias`): it still works and prints one line on stderr naming the new one.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
from pathlib import Path

from adainfer.app.user_tasks import TASK_FILE_KINDS

TASK_SUFFIXES = tuple(TASK_FILE_KINDS)  # .csv, .tsv, .jsonl, .json
CLASSIFIER_FILE = "classifier.json"  # what `calibrate --out-dir` and `demo` write into their folder


def integer(lo: int, what: str):
    """An integer >= ``lo``; ``what`` says which values are valid."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {what}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range; {what}")
        return value

    parse.__name__ = "integer"
    return parse


def number(lo: float, hi: float, *, lo_open: bool, hi_open: bool, what: str):
    """A finite number in the interval from ``lo`` to ``hi`` (each end open or closed)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {what}") from None
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {what}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = integer(1, "use a positive integer")
SPLIT_SIZE = integer(1, "use a positive number of examples")
NON_NEGATIVE = integer(0, "use an integer >= 0")
BUDGET = number(0.0, 1.0, lo_open=False, hi_open=True, what="the disagreement budget is a rate in [0, 1), e.g. 0.01")
CONFIDENCE = number(
    0.0, 1.0, lo_open=False, hi_open=True, what="the confidence is a level in [0, 1), e.g. 0.9 (0: the point estimate)"
)
AGREEMENT = number(0.0, 1.0, lo_open=False, hi_open=False, what="annotator agreement is in [0, 1] (0 keeps all)")


def nonblank(what: str):
    """Any text that is not blank."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be blank")
        return text

    parse.__name__ = "text"
    return parse


def label_word(text: str) -> str:
    """``word`` or ``label=word``, the word not blank."""
    word = text.split("=", 1)[1] if "=" in text else text
    if not word.strip():
        raise argparse.ArgumentTypeError(f"label word {text!r} is blank: give one word per label (or label=word)")
    return text


def encoding(text: str) -> str:
    """A text encoding Python knows."""
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252)") from None
    return text


def task_spec(text: str) -> str:
    """A bundled task name, an existing task file, or ``lmeval:NAME``."""
    from adainfer.app.datasets import BUNDLED_TASKS

    if text in BUNDLED_TASKS or text.startswith("lmeval:"):
        return text  # lm-eval tasks are resolved (and their errors reported) when loaded
    path = Path(text)
    if path.suffix.lower() not in TASK_SUFFIXES and not path.exists():
        raise argparse.ArgumentTypeError(
            f"unknown task {text!r}: use a bundled task ({', '.join(BUNDLED_TASKS)}), a "
            f"{'/'.join(TASK_SUFFIXES)} file or lmeval:NAME"
        )
    if not path.exists():
        raise argparse.ArgumentTypeError(f"task file not found: {path}")
    if path.is_dir() or path.suffix.lower() not in TASK_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{path} is not a task file: use a {'/'.join(TASK_SUFFIXES)} file")
    return text


def model_spec(text: str) -> str:
    """``bundled``, a Hugging Face model directory, or a ``.gguf`` file."""
    from adainfer.app.loading import BUNDLED_NAME

    if text in ("bundled", BUNDLED_NAME):
        return text
    path = Path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"GGUF file not found: {path}")
    elif not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{path} is not a Hugging Face model directory (no config.json) nor a .gguf file; or use 'bundled'"
        )
    return text


def classifier_path(text: str) -> str:
    """A classifier JSON file, or a folder holding ``classifier.json`` (what ``calibrate --out-dir``
    and ``demo`` write); returns the file's path."""
    path = Path(text)
    if path.is_dir():
        if not (path / CLASSIFIER_FILE).is_file():
            raise argparse.ArgumentTypeError(
                f"{path} is a folder without {CLASSIFIER_FILE}: pass the classifier JSON file, or the folder "
                "`adainfer calibrate --out-dir` wrote"
            )
        return str(path / CLASSIFIER_FILE)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"classifier file not found: {path} (write one with `adainfer calibrate`)")
    return text


def _writable_parent(path: Path) -> None:
    """The nearest existing folder above ``path`` (created later) is a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable")


def output_dir(text: str) -> str:
    """A folder to write into: an existing writable folder, or one that can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is an existing file; the output is a folder: choose another path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write into {path}: the folder is not writable")
    else:
        _writable_parent(path)
    return text


def output_file(text: str) -> str:
    """A classifier file to write (the deprecated ``calibrate --out FILE``)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a folder: give the classifier file's path (e.g. {path / 'clf.json'}), or use --out-dir {path}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot overwrite {path}: the file is not writable")
    _writable_parent(path)
    return text


# --------------------------------------------------------------------------------------------
# Deprecated spellings


class DeprecatedAlias(argparse.Action):
    """An old option spelling kept for one release: stores its value like a plain option and
    prints one line on stderr, ``adainfer <cmd>: warning: --old is deprecated; use --new``."""

    def __init__(self, option_strings, dest, *, use: str, **kwargs):
        self.use = use
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
            f"use {self.use}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(
    parser, old: str, new: argparse.Action | None = None, *, use: str | None = None, **kwargs
) -> argparse.Action:
    """Add ``old`` to ``parser`` (a parser, group or mutually exclusive group) as a hidden,
    deprecated spelling.

    With ``new`` (the action ``add_argument`` returned for the new spelling) ``old`` means the same:
    same destination, type, choices and nargs. Without it, ``use`` (what to write instead) and
    ``kwargs`` (``dest``, ``type``, ``default``, ...) say what ``old`` does.
    """
    if new is not None:
        same = {"dest": new.dest, "type": new.type, "choices": new.choices, "nargs": new.nargs, "metavar": new.metavar}
        kwargs = {**same, **kwargs}
        use = use or new.option_strings[0]
    if use is None:
        raise TypeError("add_deprecated_alias needs the new option's action or use=")
    kwargs.setdefault("default", argparse.SUPPRESS)  # the new option's default stands
    return parser.add_argument(old, action=DeprecatedAlias, use=use, help=argparse.SUPPRESS, **kwargs)
