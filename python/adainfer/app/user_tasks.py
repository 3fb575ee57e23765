"""Tasks from the user's files: CSV / TSV / JSONL / JSON, one labelled example per row, read through
``datasets`` (offline), and label words given on the command line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from adainfer.app.splits import balanced_splits, draw_demonstrations, group_by_class
from adainfer.app.tasks import ClassificationTask
from adainfer.app.templates import PromptTemplate, get_template

TASK_FILE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json"}


def read_dataset(path: Path, kind: str, encoding: str | None = None, text_columns: Sequence[str] = ()):
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
    kinds = TASK_FILE_KINDS
    if suffix not in kinds:
        raise ValueError(f"unsupported task file {path.name!r}: use .csv, .tsv, .jsonl or .json")
    if path.is_dir():
        raise ValueError(f"task file {path} is a directory: pass a .csv, .tsv, .jsonl or .json file")
    _check_has_rows(path, suffix[1:], encoding)
    try:
        ds = read_dataset(path, kinds[suffix], encoding, text_columns=(text_column, label_column))
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
    groups = group_by_class(ds[text_column], labels, label_names, max_chars)
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
