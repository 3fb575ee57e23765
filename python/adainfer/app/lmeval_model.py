"""The lm-evaluation-harness model ``adainfer``: lm-eval's tasks, scored by a model with AdaInfer exits.

    adainfer-lm-eval --model adainfer \\
        --model_args pretrained=bundled,classifier=clf.json,correct_full_depth=True \\
        --tasks my_task --include_path tasks/ --batch_size 32 --device cpu
    # lm-eval's own CLI with this model registered; the table gains adainfer_* rows per task

    from adainfer.app.lmeval_model import AdaInferLM, add_to_results
    lm = AdaInferLM(pretrained="bundled", classifier="clf.json", correct_full_depth=True, batch_size=32)
    results = add_to_results(lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=...))

``AdaInferLM`` is lm-eval's ``HFLM`` around a model patched by ``adainfer.apply(model, classifier)``.
Which requests exit early:

- **Single-token continuations that are label tokens** (multiple-choice tasks whose choices are the
  classifier's label words): the requests that share a context are answered by ONE forward pass of
  that context with exits on (left-padded, with an attention mask and position ids that skip the
  padding, so the context's last token is the position the classifier was calibrated on), and each
  choice is scored from that row's last-position log-probabilities, i.e. from the logits the patched
  model delivers (``AdaInferHandle``): for a row that stopped early, the exit answer's label
  log-probabilities; for a row that ran every layer, the model's own log-softmax, or with
  ``correct_full_depth=True`` the label log-probabilities with the classifier's layer-L label bias
  (what ``adainfer eval`` scores as ``runtime_accuracy``). Contexts run longest first in batches
  of ``batch_size``, the order ``adainfer.classify`` uses, so both see the same batches.
- **Everything else runs at full depth with exits off** (``handle.enabled = False``: the unpatched
  model, through HFLM's own code): multi-token continuations, single-token continuations that are
  no label token of the classifier, ``loglikelihood_rolling`` and ``generate_until``. A context
  whose choices include one that is not a label token runs at full depth as a whole: an exited row
  gives every non-label token -inf, so such a choice could never win (and -inf would reach
  lm-eval's metrics); the classifier was not calibrated for that answer space. These requests are
  counted per task and reason in the results (``full_depth_requests``) and warned about once;
  ``other_requests=error`` refuses them instead. A full-vocabulary classifier (``--vocab full``)
  exits on any single-token continuation (its exit logits are the logit lens over the vocabulary).

What is reported (``AdaInferLM.adainfer_summary()``): per task and over all tasks, the contexts run
with exits, the mean exit layer, the layers saved (1 - mean exit layer / L, the paper's pruning
ratio), the share that stopped early, the wall clock of those forward passes (and, with
``wallclock_baseline=True``, of the same batches with exits off, interleaved, and the speedup), and
the full-depth requests. lm-eval puts it into ``results["config"]["adainfer"]`` itself (through
``get_model_info``); ``add_to_results(results)`` copies it to ``results["adainfer"]`` and adds
``adainfer_*`` metric rows to each task in ``results["results"]``, which lm-eval's ``make_table``
prints beside the task's own metrics (the ``adainfer-lm-eval`` command does this; lm-eval has no
hook for a model to add rows).

model_args: ``pretrained`` (``bundled`` or a model path, loaded offline by
``adainfer.app.loading.load_model``; or a model instance with ``tokenizer=``), ``classifier`` (a
classifier JSON from ``adainfer calibrate``, or a ``StopClassifier``), ``correct_full_depth``
(default False, as the runtime's), ``other_requests`` (``full_depth`` | ``error``), ``mode``
(``compact`` | ``mask``), ``dtype`` (default float32), ``device``, ``wallclock_baseline``, and
HFLM's own (``max_length``, ``add_bos_token``, ...). On lm-eval's command line ``--batch_size`` and
``--device`` give the batch size and the device (it always passes them: not in ``--model_args``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from adainfer.app.loading import load_model
from adainfer.calibration.classifier import StopClassifier
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.patch import apply
from adainfer.runtime.wallclock import synchronize

MODEL_NAME = "adainfer"
OTHER_REQUESTS = ("full_depth", "error")
# Why a request ran at full depth (the keys of ``full_depth_requests``).
MULTI_TOKEN = "multi_token_continuation"
NOT_A_LABEL = "not_a_label_token"
ROLLING = "loglikelihood_rolling"
GENERATE = "generate_until"
UNKNOWN_TASK = "unknown"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HFLM_ARGS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "pretrained", "kwargs"}


@dataclass
class TaskStats:
    """What one task's requests cost (accumulated over the run)."""

    contexts: int = 0  # contexts run with exits on (one row each)
    requests: int = 0  # requests answered from those rows
    layers_run: int = 0  # sum over those rows of the layers each ran
    exited_early: int = 0  # rows that stopped before layer L
    seconds: float = 0.0  # forward passes with exits on
    baseline_seconds: float = 0.0  # the same batches with exits off (wallclock_baseline=True)
    full_depth: Counter = field(default_factory=Counter)  # requests run with exits off, by reason
    full_depth_seconds: float = 0.0

    def summary(self, num_layers: int, baseline: bool) -> dict:
        mean = self.layers_run / self.contexts if self.contexts else None
        out = {
            "contexts": self.contexts,
            "requests": self.requests,
            "mean_exit_layer": mean,
            "layers_saved": None if mean is None else 1.0 - mean / num_layers,
            "exited_early": self.exited_early / self.contexts if self.contexts else None,
            "wallclock_s": self.seconds,
            "full_depth_requests": dict(self.full_depth),
            "full_depth_wallclock_s": self.full_depth_seconds,
        }
        if baseline:
            out["baseline_wallclock_s"] = self.baseline_seconds
            out["speedup"] = self.baseline_seconds / self.seconds if self.seconds > 0 else None
        return out

    def add(self, other: TaskStats) -> None:
        for name in ("contexts", "requests", "layers_run", "exited_early"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("seconds", "baseline_seconds", "full_depth_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.full_depth.update(other.full_depth)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (use one of: {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


@register_model(MODEL_NAME)
class AdaInferLM(HFLM):
    """lm-eval's HFLM around a model patched with AdaInfer exits (module docstring).

    Args:
        pretrained: ``"bundled"``, a Hugging Face model folder or ``.gguf`` file (offline), or a
            ``*ForCausalLM`` instance (then ``tokenizer`` is required).
        classifier: path of a classifier JSON (``adainfer calibrate``) or a ``StopClassifier``.
        tokenizer: the tokenizer of a model instance (loaded with the model otherwise).
        correct_full_depth: score rows that run every layer with the classifier's layer-L label
            bias (``adainfer eval``'s convention); False: the model's own log-probabilities.
        other_requests: ``full_depth`` runs requests the classifier cannot answer with exits off;
            ``error`` refuses them.
        mode: the runtime's ``compact`` (finished rows leave the batch) or ``mask``.
        dtype: weights' dtype when loading (float32, bfloat16, float16).
        device: where the model runs (default: CUDA when available, else the CPU).
        batch_size: contexts per forward pass (an integer; ``auto`` is not supported).
        wallclock_baseline: also time every exit batch with exits off (interleaved), for a speedup.
        **kwargs: other HFLM arguments (``max_length``, ``add_bos_token``, ``prefix_token_id``, ...).
    """

    def __init__(
        self,
        pretrained="bundled",
        classifier: str | StopClassifier | None = None,
        tokenizer=None,
        correct_full_depth: bool = False,
        other_requests: str = "full_depth",
        mode: str = "compact",
        dtype="float32",
        device: str | None = None,
        batch_size: int | str = 1,
        wallclock_baseline: bool = False,
        **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - _HFLM_ARGS)
        if unknown:
            raise ValueError(
                f"unknown model_args for the adainfer model: {', '.join(unknown)} (adainfer's: pretrained, classifier, "
                "tokenizer, correct_full_depth, other_requests, mode, dtype, device, batch_size, wallclock_baseline; "
                "and HFLM's)"
            )
        if classifier is None:
            raise ValueError("the adainfer model needs model_args classifier=PATH (a JSON from `adainfer calibrate`)")
        if other_requests not in OTHER_REQUESTS:
            choices = ", ".join(OTHER_REQUESTS)
            raise ValueError(f"other_requests={other_requests!r} is not valid (use one of: {choices})")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the adainfer model: pass an integer (e.g. 32)")
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        clf = classifier if isinstance(classifier, StopClassifier) else StopClassifier.load(classifier)
        if isinstance(pretrained, str):
            if tokenizer is not None:
                raise ValueError("tokenizer= goes with a model instance; a model path loads its own tokenizer")
            loaded = load_model(pretrained, _as_dtype(dtype))
            model, tokenizer = loaded.model, loaded.tokenizer
        else:
            if tokenizer is None:
                raise ValueError("a model instance needs its tokenizer: AdaInferLM(pretrained=model, tokenizer=tok)")
            model = pretrained
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise
            warnings.warn(f"adainfer: device {device!r} is not available here: running on the CPU", stacklevel=2)
            device = "cpu"
        if getattr(model, "hf_device_map", None) is None:
            model = model.to(device)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.classifier = clf
        self.classifier_source = str(classifier) if not isinstance(classifier, StopClassifier) else None
        self.correct_full_depth = bool(correct_full_depth)
        self.other_requests = other_requests
        self.wallclock_baseline = bool(wallclock_baseline)
        self.handle = apply(model, clf, AdaInferConfig(mode=mode, correct_full_depth=self.correct_full_depth))
        self.num_layers = clf.n_layers
        self.label_token_ids = None if clf.vocab_mode == "full" else frozenset(int(t) for t in clf.label_token_ids)
        self.stats: dict[str, TaskStats] = {}
        self._request_tasks: list[str] | None = None
        self._exits_off_depth = 0
        self._warned: set[str] = set()

    # -- what is reported ----------------------------------------------------------------------
    def _task(self, name: str | None) -> TaskStats:
        return self.stats.setdefault(name or UNKNOWN_TASK, TaskStats())

    def adainfer_summary(self) -> dict:
        """The run's figures: per task (``tasks``) and over all of them (``all``), plus the settings."""
        total = TaskStats()
        for s in self.stats.values():
            total.add(s)
        clf = self.classifier
        return {
            "model": MODEL_NAME,
            "classifier": self.classifier_source,
            "readout": clf.readout,
            "vocab_mode": clf.vocab_mode,
            "label_words": list(clf.label_words) if clf.label_words else None,
            "num_layers": self.num_layers,
            "checked_layers": sorted(self.handle.checked_layers),
            "mode": self.handle.config.mode,
            "correct_full_depth": self.correct_full_depth,
            "other_requests": self.other_requests,
            "batch_size": self.batch_size,
            "tasks": {name: s.summary(self.num_layers, self.wallclock_baseline) for name, s in self.stats.items()},
            "all": total.summary(self.num_layers, self.wallclock_baseline),
        }

    def get_model_info(self) -> dict:
        """lm-eval merges this into ``results["config"]`` (HFLM's would query the Hub for a sha)."""
        model = self._model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(next(model.parameters()).dtype),
            "model_revision": None,
            "model_sha": "",
            "adainfer": self.adainfer_summary(),
        }

    # -- requests that run with exits off -------------------------------------------------------
    def _note_full_depth(self, reason: str, tasks: Sequence[str | None], detail: str = "") -> None:
        if self.other_requests == "error":
            raise ValueError(
                f"{len(tasks)} request(s) of task(s) {', '.join(sorted({t or UNKNOWN_TASK for t in tasks}))} cannot "
                f"exit early ({reason.replace('_', ' ')}{detail}); the adainfer model answers single-token "
                "continuations that are the classifier's label tokens. Use other_requests=full_depth to run them "
                "with exits off"
            )
        for t in tasks:
            self._task(t).full_depth[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"adainfer: {reason.replace('_', ' ')}{detail}: these requests run at full depth with exits off "
                "(counted in full_depth_requests)",
                stacklevel=3,
            )

    @contextlib.contextmanager
    def _exits_off(self, tasks: Sequence[str | None]):
        """Run the unpatched model (HFLM's own code) inside; the time goes to the tasks' full-depth share."""
        self._exits_off_depth += 1
        self.handle.enabled = False
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            seconds = time.perf_counter() - t0
            self._exits_off_depth -= 1
            self.handle.enabled = self._exits_off_depth == 0
            if self._exits_off_depth == 0 and tasks:
                for t in tasks:
                    self._task(t).full_depth_seconds += seconds / len(tasks)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tasks = [r.task_name for r in requests]
        if requests:
            self._note_full_depth(ROLLING, tasks)
        with self._exits_off(tasks):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tasks = [r.task_name for r in requests]
        if requests:
            self._note_full_depth(GENERATE, tasks)
        with self._exits_off(tasks):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    # -- loglikelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # HFLM tokenizes the requests in order and hands them to _loglikelihood_tokens: remember the tasks.
        self._request_tasks = [r.task_name for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_tasks = None

    def _why_full_depth(self, continuations: Sequence[Sequence[int]]) -> str | None:
        if any(len(c) != 1 for c in continuations):
            return MULTI_TOKEN
        if self.label_token_ids is not None and any(c[0] not in self.label_token_ids for c in continuations):
            return NOT_A_LABEL
        return None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._exits_off_depth:  # inside loglikelihood_rolling / generate_until: HFLM's own path
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        tasks = self._request_tasks
        if tasks is None or len(tasks) != len(requests):
            tasks = [None] * len(requests)
        # One row per (task, context): every choice of a multiple-choice doc shares it.
        groups: dict[tuple, list[int]] = {}
        for i, (_, context_enc, _) in enumerate(requests):
            groups.setdefault((tasks[i], tuple(context_enc)), []).append(i)
        early: list[list[int]] = []
        other: dict[str, list[int]] = {}
        for idx in groups.values():
            reason = self._why_full_depth([requests[i][2] for i in idx])
            if reason is None:
                early.append(idx)
            else:
                other.setdefault(reason, []).extend(idx)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for reason, idx in other.items():
            detail = ""
            if reason == NOT_A_LABEL:
                tokens = {requests[i][2][0] for i in idx} - self.label_token_ids
                words = sorted(self.tok_decode([t]) for t in tokens)
                detail = f" (choices {words[:6]}; the classifier's label words are {list(self.classifier.label_words)})"
            self._note_full_depth(reason, [tasks[i] for i in idx], detail)
        rest = sorted(i for idx in other.values() for i in idx)
        if rest:
            with self._exits_off([tasks[i] for i in rest]):
                scores = super()._loglikelihood_tokens(
                    [requests[i] for i in rest], disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            for i, s in zip(rest, scores, strict=True):
                results[i] = s
        if early:
            self._score_with_exits(requests, early, tasks, results, disable_tqdm)
        return results

    @torch.inference_mode()
    def _score_with_exits(self, requests, early: list[list[int]], tasks, results, disable_tqdm: bool) -> None:
        """One forward pass per context with exits on; every choice scored from its last position."""
        # Longest context string first (stable), as adainfer.classify orders its prompts.
        order = sorted(range(len(early)), key=lambda g: -len(requests[early[g][0]][0][0]))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        device = self.model.get_input_embeddings().weight.device
        bar = tqdm(total=len(order), disable=disable_tqdm or self.rank != 0, desc="adainfer: contexts with exits")
        for start in range(0, len(order), self.batch_size):
            chunk = [early[g] for g in order[start : start + self.batch_size]]
            contexts = [list(requests[idx[0]][1]) for idx in chunk]
            if max(len(c) for c in contexts) > self.max_length:
                warnings.warn(
                    f"adainfer: contexts longer than max_length {self.max_length} are cut from the left", stacklevel=2
                )
                contexts = [c[-self.max_length :] for c in contexts]
            width = max(len(c) for c in contexts)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, c in enumerate(contexts):
                ids[row, width - len(c) :] = torch.tensor(c, dtype=torch.long)
                mask[row, width - len(c) :] = 1
            # Positions count real tokens only (as generate() and adainfer.classify do).
            batch = {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
            }
            seconds, logits = self._forward(batch, exits=True)
            exits = self.handle.last_stats.exit_layers.tolist()
            if self.wallclock_baseline:
                baseline, _ = self._forward(batch, exits=False)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            greedy = logits.argmax(dim=-1).tolist()
            for row, idx in enumerate(chunk):
                stats = self._task(tasks[idx[0]])
                stats.contexts += 1
                stats.requests += len(idx)
                stats.layers_run += int(exits[row])
                stats.exited_early += int(exits[row] < self.num_layers)
                stats.seconds += seconds / len(chunk)
                if self.wallclock_baseline:
                    stats.baseline_seconds += baseline / len(chunk)
                for i in idx:
                    token = requests[i][2][0]
                    answer = (float(logprobs[row, token]), greedy[row] == token)
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()

    def _forward(self, batch: dict[str, torch.Tensor], exits: bool) -> tuple[float, torch.Tensor]:
        """(seconds, (B, V) last-position logits) of one pass with exits on or off."""
        self.handle.enabled = exits
        try:
            synchronize(self.device)
            t0 = time.perf_counter()
            out = self.model(**batch, logits_to_keep=1)
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        finally:
            self.handle.enabled = True
        return seconds, out.logits[:, -1, :]


# --------------------------------------------------------------------------------------------
# Results and the command line

TABLE_KEYS = ("mean_exit_layer", "layers_saved", "exited_early", "wallclock_s", "speedup")


def add_to_results(results: dict | None) -> dict | None:
    """Copy ``results["config"]["adainfer"]`` (put there by lm-eval) to ``results["adainfer"]`` and add
    ``adainfer_<figure>,none`` rows to each task's ``results["results"][task]`` (mean exit layer, layers
    saved, share exited early, wall clock, speedup when measured, full-depth requests), so that
    ``lm_eval.utils.make_table(results)`` prints them beside the task's metrics. Returns ``results``."""
    if not results:
        return results
    summary = (results.get("config") or {}).get("adainfer")
    if summary is None:
        return results
    results["adainfer"] = summary
    for task, figures in summary["tasks"].items():
        row = results.get("results", {}).get(task)
        if row is None:
            continue
        for key in TABLE_KEYS:
            if figures.get(key) is not None:
                row[f"adainfer_{key},none"] = figures[key]
        row["adainfer_full_depth_requests,none"] = sum(figures["full_depth_requests"].values())
    return results


def main(argv: list[str] | None = None) -> int:
    """``adainfer-lm-eval``: lm-eval's command line with the ``adainfer`` model registered; the results
    (printed table, saved JSON) carry the AdaInfer figures (``add_to_results``)."""
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.__main__ import cli_evaluate

    original = evaluator.simple_evaluate

    def simple_evaluate(*args, **kwargs):
        return add_to_results(original(*args, **kwargs))

    # lm-eval's `run` command looks simple_evaluate up on the package when it runs.
    lm_eval.simple_evaluate = simple_evaluate
    saved_argv = sys.argv
    sys.argv = [Path(saved_argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
        del lm_eval.simple_evaluate
    return 0


if __name__ == "__main__":
    sys.exit(main())
