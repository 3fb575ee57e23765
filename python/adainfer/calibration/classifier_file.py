"""The stop classifier on disk: a JSON file, a probe's weights beside it, and the checks of both.

Saved as JSON (never pickle) with a format version and the model's identity; a probe's weights go
beside it in a safetensors file (``clf.probe.safetensors`` for ``clf.json``) named in the JSON with
its SHA-256 and size. Loading validates every field (and the probe file's hash and shapes);
``StopClassifier.save`` / ``load`` / ``to_dict`` / ``from_dict`` are the entry points.

The runtime computes the score in float32, so every weight, every folded per-layer bias and every
label bias must be finite in float32 (a value finite only in float64, like 1e39, would give the
runtime inf/NaN scores while the float64 simulation stops rows). ``info`` is free-form except for
the keys the package reads back (``INFO_FIELDS``, ``TASK_INFO_FIELDS``: ``adainfer eval`` rebuilds
the task from ``info["task"]``), whose types and ranges are checked too. ``validate`` runs these
checks on every ``StopClassifier`` built, loaded or fitted.

This module reads and writes plain data: ``StopClassifier`` (``classifier``) imports it, never the
reverse.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from adainfer.calibration.choices import DTYPES, LABEL_BIAS_ESTIMATORS, METHODS, READOUTS, SPLITS, TARGETS, VOCAB_MODES
from adainfer.calibration.probe import ProbeHeads

FORMAT = "adainfer.StopClassifier"
# 3: the keys "readout" and "label_bias_estimator" (version 2 named them "exit_head" and
# "bias_method"); 2: probes; version 1 files (lens only) still load.
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
# Keys renamed in version 3: the old spelling is read from older files.
_RENAMED_KEYS = {"readout": "exit_head", "label_bias_estimator": "bias_method"}
PROBE_FORMAT = "adainfer.ProbeHeads"
# The runtime's score is fp32 (the fused exit head): larger magnitudes overflow to inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A classifier file is ~4 levels deep (root, info, task, sizes); anything much deeper is not one,
# and would overflow Python's recursion limit when decoded or re-encoded.
MAX_JSON_DEPTH = 32


class ClassifierFileError(ValueError):
    """A classifier file that is corrupt, hand-edited into inconsistency, or of another format."""


def to_dict(c) -> dict:
    """The JSON object of a ``StopClassifier`` ``c`` (a probe's weights are named by ``save``)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": asdict(c.identity),
        "method": c.method,
        "target": c.target,
        "vocab_mode": c.vocab_mode,
        "features": list(c.features),
        "weights": {"top_prob": c.w_top_prob, "gap": c.w_gap, "layer": c.w_layer},
        "intercept": c.intercept,
        "threshold": c.threshold,
        "min_layer": c.min_layer,
        "label_token_ids": None if c.label_token_ids is None else list(c.label_token_ids),
        "label_words": None if c.label_words is None else list(c.label_words),
        "label_bias": None if c.label_bias is None else [list(r) for r in c.label_bias],
        "label_bias_estimator": c.label_bias_estimator,
        "info": c.info,
        "readout": c.readout,
        "probe": None if c.probe is None else _probe_meta(c.probe),
    }


def save(c, path: str | Path) -> None:
    """Write ``c`` as the JSON file ``path`` (and, for a probe classifier, its weights beside it);
    the file's folder is created when missing."""
    path = Path(path)
    data = to_dict(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c.probe is not None:
        target = _probe_path(path)
        payload = _probe_bytes(c.probe)
        target.write_bytes(payload)
        data["probe"] |= {"file": target.name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    # json writes floats with repr(): the weights round-trip bit-exactly.
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    """The decoded JSON of a classifier file (not yet validated: ``fields_from_dict`` does that).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ClassifierFileError: a directory, unreadable, not JSON, or nested too deep (naming ``path``).
    """
    path = Path(path)
    if path.is_dir():
        raise ClassifierFileError(
            f"{path} is a directory: pass the classifier JSON file (e.g. {path / 'classifier.json'})"
        )
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except UnicodeDecodeError as exc:
        raise ClassifierFileError(f"{path}: not a valid classifier JSON file ({exc})") from exc
    except OSError as exc:
        raise ClassifierFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ClassifierFileError(
            f"{path}: not a classifier file (JSON nested deeper than Python can decode)"
        ) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ClassifierFileError(f"{path}: not a valid classifier JSON file ({exc})") from exc
    try:
        _check_depth(data)
    except ClassifierFileError as exc:
        raise ClassifierFileError(f"{path}: {exc}") from None
    return data


def fields_from_dict(data: dict, folder: str | Path | None = None) -> dict:
    """``StopClassifier``'s constructor arguments from ``to_dict`` output, every field checked
    (ClassifierFileError otherwise); ``identity`` is the dict of ``ModelIdentity``'s fields.

    ``folder``: where a probe classifier's weight file lies (``load`` passes the JSON's folder).
    """
    if not isinstance(data, dict):
        raise ClassifierFileError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ClassifierFileError(f"not a stop classifier (format {data.get('format')!r}, expected {FORMAT!r})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READ_VERSIONS:
        raise ClassifierFileError(
            f"classifier format version {version!r} is not supported (this version reads "
            f"{', '.join(map(str, READ_VERSIONS))}): re-run `adainfer calibrate`"
        )
    required = ("model", "method", "target", "vocab_mode", "weights", "intercept", "threshold", "min_layer")
    missing = [k for k in required if k not in data]
    if missing:
        raise ClassifierFileError(f"missing key(s): {', '.join(missing)}")
    model = _typed(data, "model", dict)
    for key, kind in (("model_type", str), ("num_hidden_layers", int), ("vocab_size", int), ("hidden_size", int)):
        if key not in model:
            raise ClassifierFileError(f"model identity lacks {key!r}")
        _typed(model, key, kind, where="model.")
    weights = _typed(data, "weights", dict)
    for key in ("top_prob", "gap", "layer"):
        if key not in weights:
            raise ClassifierFileError(f"weights lack {key!r}")
        _number(weights, key, where="weights.")
    threshold = data["threshold"]
    if threshold is not None:
        threshold = _number(data, "threshold")
    if version < 3:
        data = {new: data[old] for new, old in _RENAMED_KEYS.items() if old in data} | data
    bias = data.get("label_bias")
    ids = data.get("label_token_ids")
    words = data.get("label_words")
    return dict(
        identity={k: model[k] for k in ("model_type", "num_hidden_layers", "vocab_size", "hidden_size")},
        method=_typed(data, "method", str),
        target=_typed(data, "target", str),
        vocab_mode=_typed(data, "vocab_mode", str),
        w_top_prob=_number(weights, "top_prob"),
        w_gap=_number(weights, "gap"),
        w_layer=_number(weights, "layer"),
        intercept=_number(data, "intercept"),
        threshold=threshold,
        min_layer=_typed(data, "min_layer", int),
        label_token_ids=None if ids is None else tuple(_int_list(ids, "label_token_ids")),
        label_words=None if words is None else tuple(_str_list(words, "label_words")),
        label_bias=None if bias is None else _matrix(bias),
        label_bias_estimator=_typed(data, "label_bias_estimator", str) if "label_bias_estimator" in data else "none",
        info=_info(data.get("info")),
        readout=_typed(data, "readout", str) if "readout" in data else "lens",
        probe=_load_probe(data.get("probe"), folder),
    )


def _probe_path(path: Path) -> Path:
    """``clf.json`` -> ``clf.probe.safetensors`` (beside it)."""
    return path.with_name(path.stem + ".probe.safetensors")


def _probe_meta(probe: ProbeHeads) -> dict:
    n_layers, k, d = probe.weight.shape
    return {
        "format": PROBE_FORMAT,
        "layers": n_layers,
        "labels": k,
        "hidden_size": d,
        "c": probe.c,
        "n_fit": probe.n_fit,
    }


def _probe_bytes(probe: ProbeHeads) -> bytes:
    from safetensors import numpy as safetensors_numpy

    return safetensors_numpy.save(
        {
            "weight": np.ascontiguousarray(probe.weight, dtype=np.float32),
            "bias": np.ascontiguousarray(probe.bias, dtype=np.float32),
        },
        metadata={"format": PROBE_FORMAT},
    )


def _load_probe(meta, folder: str | Path | None) -> ProbeHeads | None:
    """The probe weights a classifier file names, checked against its hash and shapes."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
        raise ClassifierFileError(f"probe must be an object of format {PROBE_FORMAT!r}")
    for key in ("file", "sha256", "layers", "labels", "hidden_size"):
        if key not in meta:
            raise ClassifierFileError(f"probe lacks {key!r}")
    if folder is None:
        raise ClassifierFileError(
            "a probe classifier's weights live in a file beside it: use StopClassifier.load(path)"
        )
    name = _typed(meta, "file", str, where="probe.")
    if Path(name).name != name:
        raise ClassifierFileError(f"probe.file must be a file name beside the classifier, got {name!r}")
    target = Path(folder) / name
    try:
        payload = target.read_bytes()
    except OSError as exc:
        raise ClassifierFileError(f"probe weights {target} cannot be read ({exc.strerror or exc})") from None
    if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
        raise ClassifierFileError(f"probe weights {target} do not match the classifier's sha256 (replaced or damaged)")
    from safetensors import numpy as safetensors_numpy

    try:
        arrays = safetensors_numpy.load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise ClassifierFileError(f"probe weights {target} are not a safetensors file ({exc})") from None
    weight, bias = arrays.get("weight"), arrays.get("bias")
    shape = (meta["layers"], meta["labels"], meta["hidden_size"])
    if weight is None or bias is None or weight.shape != shape or bias.shape != shape[:2]:
        raise ClassifierFileError(f"probe weights {target} do not have the shapes the classifier states {shape}")
    c = _number(meta, "c", where="probe.") if "c" in meta else 0.0
    n_fit = _typed(meta, "n_fit", int, where="probe.") if "n_fit" in meta else 0
    return ProbeHeads(weight=weight.astype(np.float32), bias=bias.astype(np.float32), c=c, n_fit=n_fit)


def _check_depth(data) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` (iteratively: no recursion to overflow)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ClassifierFileError(
                f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep: not a classifier file "
                "(re-run `adainfer calibrate`)"
            )
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _info(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClassifierFileError(
            f"info must be a JSON object (or null), got {type(value).__name__} ({_short(value)}): "
            "fix the file or re-run `adainfer calibrate`"
        )
    return value


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str):
    raise ClassifierFileError(f"{name} is not a valid number in a classifier file")


def _typed(data: dict, key: str, kind: type, where: str = ""):
    value = data[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ClassifierFileError(f"{where}{key} must be {kind.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _number(data: dict, key: str, where: str = "") -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClassifierFileError(f"{where}{key} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ClassifierFileError(f"{where}{key} must be finite, got {value!r}")
    _check_float32(value, f"{where}{key}")
    return float(value)


def _check_float32(value: float, what: str) -> None:
    if abs(value) > FLOAT32_MAX:
        raise ClassifierFileError(
            f"{what} {value!r} does not fit in float32, the precision the runtime scores in "
            f"(|x| <= {FLOAT32_MAX:.6g}): re-run `adainfer calibrate`"
        )


def _int_list(values, name: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ClassifierFileError(f"{name} must be a list of integers, got {values!r}")
    return values


def _str_list(values, name: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ClassifierFileError(f"{name} must be a list of strings, got {values!r}")
    return values


def _matrix(rows) -> tuple[tuple[float, ...], ...]:
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ClassifierFileError("label_bias must be a list of per-layer lists")
    out = []
    for k, r in enumerate(rows):
        row = []
        for v in r:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ClassifierFileError(f"label_bias row {k + 1} holds a non-finite or non-numeric value {v!r}")
            if abs(v) > FLOAT32_MAX:
                raise ClassifierFileError(
                    f"label_bias row {k + 1} holds {v!r}, which does not fit in float32 (the exit head's bias): "
                    "re-run `adainfer calibrate`"
                )
            row.append(float(v))
        out.append(tuple(row))
    return tuple(out)


def _validate_probe(c) -> None:
    if c.readout not in READOUTS:
        raise ClassifierFileError(f"readout {c.readout!r} is not one of {', '.join(READOUTS)}")
    if c.readout == "lens":
        if c.probe is not None:
            raise ClassifierFileError("a lens classifier carries no probe")
        return
    if c.vocab_mode != "labels":
        raise ClassifierFileError("probe readouts answer over the label tokens: vocab_mode must be 'labels'")
    if c.probe is None:
        raise ClassifierFileError("readout 'probe' needs the probe weights")
    want = (c.identity.num_hidden_layers - 1, len(c.label_token_ids), c.identity.hidden_size)
    if c.probe.weight.shape != want or c.probe.bias.shape != want[:2]:
        raise ClassifierFileError(
            f"probe weights have shape {c.probe.weight.shape}; {c.identity.describe()} with "
            f"{want[1]} labels needs (layers - 1, labels, hidden) = {want}"
        )
    f32 = np.finfo(np.float32).max
    for name, arr in (("weight", c.probe.weight), ("bias", c.probe.bias)):
        if not np.isfinite(arr).all() or np.abs(arr).max(initial=0.0) > f32:
            raise ClassifierFileError(f"probe {name} holds a value that is not a finite float32")


def validate(c) -> None:
    """Consistency checks of a ``StopClassifier`` ``c``, shared by its constructor and the loader
    (ClassifierFileError)."""
    ident = c.identity
    for name in ("num_hidden_layers", "vocab_size", "hidden_size"):
        value = getattr(ident, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClassifierFileError(f"model.{name} must be int, got {type(value).__name__} ({value!r})")
    n_layers = ident.num_hidden_layers
    if n_layers < 1 or ident.vocab_size < 1 or ident.hidden_size < 1:
        raise ClassifierFileError(f"implausible model identity {asdict(ident)}")
    for name, allowed in (("method", METHODS), ("target", TARGETS), ("vocab_mode", VOCAB_MODES)):
        if getattr(c, name) not in allowed:
            raise ClassifierFileError(f"{name} {getattr(c, name)!r} is not one of {', '.join(allowed)}")
    if c.label_bias_estimator not in LABEL_BIAS_ESTIMATORS:
        raise ClassifierFileError(
            f"label_bias_estimator {c.label_bias_estimator!r} is not one of {', '.join(LABEL_BIAS_ESTIMATORS)}"
        )
    for name in ("w_top_prob", "w_gap", "w_layer", "intercept"):
        value = getattr(c, name)
        if not math.isfinite(value):
            raise ClassifierFileError(f"weight {name} is not finite ({value!r})")
        _check_float32(value, f"weight {name}")
    if c.threshold is not None and not math.isfinite(c.threshold):
        raise ClassifierFileError(f"threshold is not finite ({c.threshold!r}); use null for 'never stop early'")
    if isinstance(c.min_layer, bool) or not isinstance(c.min_layer, int):
        raise ClassifierFileError(f"min_layer must be int, got {type(c.min_layer).__name__} ({c.min_layer!r})")
    if not 1 <= c.min_layer <= n_layers:
        raise ClassifierFileError(f"min_layer {c.min_layer} is outside 1..{n_layers}")
    for k in c.checked_layers:
        # the bias of the kernel's StopRule at layer k (stop_rule), in the runtime's float32
        bias = c.intercept + c.w_layer * k - c.threshold
        if not abs(bias) <= FLOAT32_MAX:
            raise ClassifierFileError(
                f"the score bias of layer {k} (intercept + w_layer * {k} - threshold = {bias!r}) does not fit "
                f"in float32, the precision the runtime scores in: re-run `adainfer calibrate`"
            )
    ids = c.label_token_ids
    if c.vocab_mode == "labels" and (ids is None or len(ids) < 2):
        raise ClassifierFileError("label mode needs at least 2 label_token_ids")
    if ids is not None:
        if len(set(ids)) != len(ids):
            raise ClassifierFileError(f"label_token_ids {list(ids)} are not distinct")
        bad = [t for t in ids if not 0 <= t < ident.vocab_size]
        if bad:
            raise ClassifierFileError(f"label_token_ids {bad} are outside the vocabulary of {ident.vocab_size}")
        if c.label_words is not None and len(c.label_words) != len(ids):
            raise ClassifierFileError(f"{len(c.label_words)} label_words for {len(ids)} label_token_ids")
    if c.label_bias is not None:
        if c.vocab_mode != "labels":
            raise ClassifierFileError("label_bias is only meaningful in label mode")
        if len(c.label_bias) != n_layers:
            raise ClassifierFileError(f"label_bias has {len(c.label_bias)} rows; the model has {n_layers} layers")
        widths = {len(r) for r in c.label_bias}
        if widths != {len(ids)}:
            raise ClassifierFileError(
                f"label_bias rows have {sorted(widths)} entries; expected {len(ids)} (one per label)"
            )
        if not all(math.isfinite(v) for r in c.label_bias for v in r):
            raise ClassifierFileError("label_bias holds a non-finite value")
        if not all(abs(v) <= FLOAT32_MAX for r in c.label_bias for v in r):
            raise ClassifierFileError("label_bias holds a value that does not fit in float32 (the exit head's bias)")
    _validate_info(c.info)
    _validate_probe(c)


# The keys of ``info`` that the package reads back, with their types and ranges (every other key is
# free-form): ``adainfer eval`` reads the budget and rebuilds the task of ``info["task"]``.
_NUMBER = (int, float)
INFO_FIELDS = {
    "budget": (_NUMBER, lambda v: 0 <= v < 1, "in [0, 1)"),
    "confidence": ((*_NUMBER, type(None)), lambda v: v is None or 0 < v < 1, "in (0, 1) or null"),
    "task": ((dict, type(None)), None, ""),
    "dtype": (str, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
}
TASK_INFO_FIELDS = {
    "task": (str, None, ""),
    "k_shot": (int, lambda v: v >= 0, ">= 0"),
    "template": ((str, type(None)), None, ""),  # null: the bundled task's own template
    "seed": (int, None, ""),
    "sizes": (dict, None, ""),
    "label_words": ((list, type(None)), None, ""),
    "label_words_arg": ((list, type(None)), None, ""),
    "min_confidence": (_NUMBER, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "text_column": (str, None, ""),
    "label_column": (str, None, ""),
    "encoding": ((str, type(None)), None, ""),
}


def _check_fields(values: dict, fields: dict, where: str) -> None:
    for key, (kinds, ok, what) in fields.items():
        if key not in values:
            continue
        value = values[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ClassifierFileError(
                f"{where}{key} must be {names}, got {type(value).__name__} ({_short(value)}): "
                "fix the file or re-run `adainfer calibrate`"
            )
        if ok is not None and not ok(value):
            raise ClassifierFileError(f"{where}{key} must be {what}, got {value!r}: fix the file or re-run calibrate")


def _validate_info(info) -> None:
    """The keys of ``info`` the package interprets have the types and ranges it needs."""
    if not isinstance(info, dict):
        raise ClassifierFileError(f"info must be a dict (a JSON object), got {type(info).__name__} ({_short(info)})")
    _check_fields(info, INFO_FIELDS, "info.")
    task = info.get("task")
    if task is None:
        return
    _check_fields(task, TASK_INFO_FIELDS, "info.task.")
    for key in ("label_words", "label_words_arg"):
        words = task.get(key)
        if words is not None and not all(isinstance(w, str) for w in words):
            raise ClassifierFileError(f"info.task.{key} must be a list of strings, got {_short(words)}")
    sizes = task.get("sizes")
    if sizes is not None:
        for split, n in sizes.items():
            if split not in SPLITS:
                raise ClassifierFileError(f"info.task.sizes has split {split!r}; the splits are {', '.join(SPLITS)}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ClassifierFileError(f"info.task.sizes.{split} must be a positive int, got {_short(n)}")
