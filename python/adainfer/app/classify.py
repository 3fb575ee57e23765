"""In-context classification with early exit: texts or prompts in; labels, label probabilities and
exit layers out, through the real runtime (the patched model's own read-out).

    from adainfer import classify
    result = classify(model, tokenizer, ["what a great day!"], clf, prompt=rendered_task)
    result.labels, result.probs, result.exit_layers

Each answer is the one the patched model delivers (``AdaInferHandle``): at an exit, the exit head's
answer (with that layer's label bias); at full depth, the model's own answer, or its label-bias
corrected answer with ``correct_full_depth=True`` (what ``adainfer eval`` scores: say so when you
report it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adainfer.calibration.classifier import StopClassifier
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.patch import patched
from adainfer.runtime.wallclock import padded_batches


@dataclass(frozen=True)
class Classification:
    """Per-input answers of ``classify``.

    Attributes:
        labels: the answer of each input as a label word (None where the answer is no label word:
            possible only for a full-vocabulary classifier).
        label_index: (N,) int64 index into ``label_words`` (-1: no label word).
        probs: (N, K) fp32 label probabilities behind each answer (NaN rows for a full-vocabulary
            classifier, whose answers are over the whole vocabulary).
        answer_prob: (N,) fp32 probability of each answer.
        answer_token: (N,) int64 vocabulary id of each answer.
        exit_layers: (N,) int64 layers each input ran (``num_layers``: the whole model).
        num_layers: L.
        label_words: the K label words, in label-index order.
        correct_full_depth: whether full-depth answers carry the label-bias correction.
    """

    labels: list[str | None]
    label_index: np.ndarray
    probs: np.ndarray
    answer_prob: np.ndarray
    answer_token: np.ndarray
    exit_layers: np.ndarray
    num_layers: int
    label_words: tuple[str, ...]
    correct_full_depth: bool

    @property
    def layers_saved(self) -> float:
        """1 - mean layers run / L (the paper's layer pruning ratio) over these inputs."""
        if len(self.exit_layers) == 0:
            return 0.0
        return 1.0 - float(np.mean(self.exit_layers)) / self.num_layers

    def __len__(self) -> int:
        return len(self.labels)


def _prompts(inputs: Sequence[str], prompt) -> list[str]:
    if isinstance(inputs, str):
        raise TypeError("inputs must be a list of strings, not one string (wrap it: [text])")
    if prompt is None:
        return list(inputs)
    if isinstance(prompt, str):
        if "{text}" not in prompt:
            raise ValueError("a prompt format string must contain '{text}'")
        return [prompt.replace("{text}", t) for t in inputs]
    build = getattr(prompt, "prompt", prompt)  # a RenderedTask, or any callable text -> prompt
    if not callable(build):
        raise TypeError(
            f"prompt must be None, a format string, a callable or a rendered task, got {type(prompt).__name__}"
        )
    return [build(t) for t in inputs]


@torch.inference_mode()
def classify(
    model,
    tokenizer,
    inputs: Sequence[str],
    classifier: StopClassifier,
    *,
    prompt: str | Callable[[str], str] | None = None,
    batch_size: int = 32,
    correct_full_depth: bool = False,
    config: AdaInferConfig | None = None,
    progress: bool | None = None,
) -> Classification:
    """Classify ``inputs`` with early exit and return the answers the patched model delivers.

    Args:
        model: a ``*ForCausalLM`` of a supported family (patched for the call, then restored).
        tokenizer: its tokenizer, padding on the left.
        inputs: prompts, or texts when ``prompt`` turns a text into a prompt.
        classifier: a ``StopClassifier`` calibrated for this model and task.
        prompt: None (``inputs`` are prompts), a format string with ``{text}``, a callable, or a
            task (``ClassificationTask``, rendered with ``tokenizer``, or a ``RenderedTask``): its
            few-shot prompt for each text.
        batch_size: prompts per forward pass (left-padded; similar lengths are batched together).
        correct_full_depth: correct the answers of inputs that run every layer with the
            classifier's layer-L label bias (the evaluation's convention); off: the model's own.
        config: the runtime's checked layers / mode (default ``AdaInferConfig()``); its
            ``correct_full_depth`` is set from the argument.
        progress: a progress bar (default: when there is more than one batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if classifier.label_token_ids is None:
        raise ValueError("this classifier has no label tokens: classify needs one calibrated on a task")
    if hasattr(prompt, "render") and not hasattr(prompt, "prompt"):
        prompt = prompt.render(tokenizer)  # a ClassificationTask: its few-shot prompt for this tokenizer
    prompts = _prompts(inputs, prompt)
    n = len(prompts)
    labels = torch.tensor(classifier.label_token_ids, dtype=torch.int64)
    words = tuple(classifier.label_words or (str(int(t)) for t in labels))
    num_layers = classifier.n_layers
    k = labels.numel()
    out_label = np.full(n, -1, dtype=np.int64)
    out_probs = np.full((n, k), np.nan, dtype=np.float32)
    out_prob = np.full(n, np.nan, dtype=np.float32)
    out_token = np.full(n, -1, dtype=np.int64)
    out_exits = np.full(n, num_layers, dtype=np.int64)
    # Similar lengths share a batch (less padding); results go back in input order.
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    device = model.get_input_embeddings().weight.device
    cfg = dataclasses.replace(config or AdaInferConfig(), correct_full_depth=correct_full_depth)
    from tqdm.auto import tqdm

    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    show = progress if progress is not None else len(chunks) > 1
    with patched(model, classifier, cfg) as handle:
        for idx in tqdm(chunks, desc="classify", unit="batch", disable=not show, leave=False):
            (batch,) = padded_batches(tokenizer, [prompts[i] for i in idx], len(idx), device)
            model(**batch, logits_to_keep=1)
            stats = handle.last_stats
            out_exits[idx] = stats.exit_layers.cpu().numpy()
            out_prob[idx] = stats.answer_prob.cpu().numpy()
            out_token[idx] = stats.answer_token.cpu().numpy()
            if stats.answer_label is not None:
                out_label[idx] = stats.answer_label.cpu().numpy()
                out_probs[idx] = stats.label_logprobs.exp().cpu().numpy()
            else:  # a full-vocabulary classifier: the answer is a token, maybe a label word
                tokens = stats.answer_token.cpu()
                match = tokens[:, None] == labels[None, :]
                out_label[idx] = torch.where(match.any(1), match.int().argmax(1), -1).numpy()
    return Classification(
        labels=[words[i] if i >= 0 else None for i in out_label],
        label_index=out_label,
        probs=out_probs,
        answer_prob=out_prob,
        answer_token=out_token,
        exit_layers=out_exits,
        num_layers=num_layers,
        label_words=words,
        correct_full_depth=correct_full_depth,
    )
