"""Per-layer logit-lens features of the last prompt token, from one pass of the unpatched model.

For each example i and layer k = 1..L ("after k decoder layers"; k = L is the full model), the
last token's hidden state h_ik is decoded through the model's own final norm and LM head:

    logits_ik = W · norm(h_ik)                       (V,)   full vocabulary
    z_ik      = logits_ik[label_token_ids]           (K,)   the task's label words

and we keep
    * the full-vocabulary exit-head signals: top-1 probability, gap = p1 - p2, argmax token id
      (``_decode_layer``, the one place that calls the exit head);
    * the K raw label logits z_ik, from which every label-mode quantity is derived with or without
      a per-layer label bias b_k (K,) (see :mod:`adainfer.calibration.labelbias`):
          p_ik = softmax(z_ik + b_k),  top_prob = max p,  gap = p(1) - p(2),  pred = argmax p,
          margin (K = 2) = (z_ik1 + b_k1) - (z_ik0 + b_k0).
      These are exactly what the fused kernel computes with ``vocab_subset = label_token_ids``
      and ``logit_bias = b_k`` (tests check it), so the calibration sees what the runtime sees.
    * optionally (``keep_hidden``) the raw last-token hidden states h_ik of layers 1..L-1 (float32),
      which per-layer probes are fitted on (:mod:`adainfer.calibration.probe`).

Hugging Face's ``output_hidden_states`` returns L+1 states: the embeddings, the raw outputs of
layers 1..L-1, and the *final-normed* output of layer L. Layer L is therefore read from the model's
own logits (never normed twice).

Speed: when every prompt is ``prefix + suffix`` and the tokenizer splits them at that boundary
(checked per prompt), the prefix (instruction + demonstrations) runs once and its K/V cache is
reused for every batch; only the suffixes run per example. Otherwise whole prompts run in
left-padded batches. Both give the same features (tested).
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from adainfer_kernels.head import ExitSignals, ReadoutHead
from adainfer_kernels.reference import exit_head_ref, head_logits_ref, signals_from_logits

FEATURES_FORMAT = 1


@dataclass
class LayerFeatures:
    """Per-(example, layer) features of one split. Layer axis index j is layer k = j + 1.

    Attributes:
        label_logits: (N, L, K) float32 raw logits of the label tokens (no bias).
        vocab_top_prob: (N, L) float32 full-vocabulary top-1 probability, or None.
        vocab_gap: (N, L) float32 full-vocabulary p1 - p2, or None.
        vocab_argmax: (N, L) int64 full-vocabulary argmax token id, or None.
        labels: (N,) int64 gold label index, -1 where unknown.
        label_token_ids: (K,) int64 token ids of the label words.
        prompt_lengths: (N,) int64 tokens of each whole prompt (prefix included).
        hidden: (N, L-1, d) float32 raw last-token hidden states after layers 1..L-1, or None.
        meta: JSON-able facts (model identity, task, split).
    """

    label_logits: np.ndarray
    labels: np.ndarray
    label_token_ids: np.ndarray
    prompt_lengths: np.ndarray
    vocab_top_prob: np.ndarray | None = None
    vocab_gap: np.ndarray | None = None
    vocab_argmax: np.ndarray | None = None
    hidden: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return self.label_logits.shape[0]

    @property
    def n_layers(self) -> int:
        return self.label_logits.shape[1]

    @property
    def n_labels(self) -> int:
        return self.label_logits.shape[2]

    @property
    def has_vocab(self) -> bool:
        return self.vocab_argmax is not None

    def subset(self, index: np.ndarray | slice) -> LayerFeatures:
        """The features of some examples (rows)."""

        def take(a):
            return None if a is None else a[index]

        return replace(
            self,
            label_logits=self.label_logits[index],
            labels=self.labels[index],
            prompt_lengths=self.prompt_lengths[index],
            vocab_top_prob=take(self.vocab_top_prob),
            vocab_gap=take(self.vocab_gap),
            vocab_argmax=take(self.vocab_argmax),
            hidden=take(self.hidden),
        )

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (no pickle: arrays plus the meta as a JSON string)."""
        arrays = {
            "label_logits": self.label_logits,
            "labels": self.labels,
            "label_token_ids": self.label_token_ids,
            "prompt_lengths": self.prompt_lengths,
            "meta_json": np.array(json.dumps({"format": FEATURES_FORMAT, **self.meta})),
        }
        if self.has_vocab:
            arrays.update(vocab_top_prob=self.vocab_top_prob, vocab_gap=self.vocab_gap, vocab_argmax=self.vocab_argmax)
        if self.hidden is not None:
            arrays["hidden"] = self.hidden
        np.savez_compressed(Path(path), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> LayerFeatures:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            if meta.pop("format", None) != FEATURES_FORMAT:
                raise ValueError(f"{path}: not a features file of format {FEATURES_FORMAT}")
            vocab = {k: z[k] for k in ("vocab_top_prob", "vocab_gap", "vocab_argmax", "hidden") if k in z.files}
            return cls(
                label_logits=z["label_logits"],
                labels=z["labels"],
                label_token_ids=z["label_token_ids"],
                prompt_lengths=z["prompt_lengths"],
                meta=meta,
                **vocab,
            )


# --------------------------------------------------------------------------------------------
# Label-mode quantities, derived from the raw label logits and an optional per-layer bias


def _biased(features: LayerFeatures, bias: np.ndarray | None) -> np.ndarray:
    z = features.label_logits.astype(np.float64)
    if bias is None:
        return z
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape != (features.n_layers, features.n_labels):
        raise ValueError(f"label bias has shape {bias.shape}; expected (layers, labels) = {z.shape[1:]}")
    return z + bias[None]


def label_probs(features: LayerFeatures, bias: np.ndarray | None = None) -> np.ndarray:
    """(N, L, K) softmax over the label tokens of ``z + bias``."""
    z = _biased(features, bias)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def label_signals(features: LayerFeatures, bias: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(top_prob, gap, pred), each (N, L): the exit head's signals over the label tokens.

    ``pred`` is the label index (0..K-1) of the top probability, the lower index on a tie (the
    kernel's rule). With K = 2: ``top_prob = sigmoid(|margin|)`` and ``gap = 2 top_prob - 1``.
    """
    p = label_probs(features, bias)
    pred = p.argmax(axis=-1)
    top = np.take_along_axis(p, pred[..., None], axis=-1)[..., 0]
    if features.n_labels > 1:
        rest = p.copy()
        np.put_along_axis(rest, pred[..., None], -np.inf, axis=-1)
        second = rest.max(axis=-1)
    else:
        second = np.zeros_like(top)
    return top.astype(np.float32), (top - second).astype(np.float32), pred.astype(np.int64)


def label_margin(features: LayerFeatures, bias: np.ndarray | None = None) -> np.ndarray:
    """(N, L) corrected margin ``(z_1 + b_1) - (z_0 + b_0)`` of a two-label task."""
    if features.n_labels != 2:
        raise ValueError(f"the label margin is defined for 2 labels; this task has {features.n_labels}")
    z = _biased(features, bias)
    return z[..., 1] - z[..., 0]


def vocab_label_pred(features: LayerFeatures) -> np.ndarray:
    """(N, L) label index of the full-vocabulary argmax, -1 when it is no label word."""
    if not features.has_vocab:
        raise ValueError("these features were collected without the full-vocabulary signals")
    out = np.full(features.vocab_argmax.shape, -1, dtype=np.int64)
    for k, tok in enumerate(features.label_token_ids):
        out[features.vocab_argmax == tok] = k
    return out


# --------------------------------------------------------------------------------------------
# Collection


def _decode_layer(
    hidden: torch.Tensor, head: ReadoutHead | None, label_head: ReadoutHead
) -> tuple[ExitSignals | None, torch.Tensor]:
    """Decode last-token hidden states of one layer: the single call site of the exit head.

    Args:
        hidden: (R, d) raw (un-normed) hidden states after some layer k < L.
        head: the full-vocabulary ``ReadoutHead`` (None: skip the full-vocabulary signals).
        label_head: the same head restricted to the label tokens, without bias.

    Returns:
        (full-vocabulary signals or None, (R, K) fp32 raw label logits).
    """
    signals = exit_head_ref(hidden, head) if head is not None else None
    return signals, head_logits_ref(hidden, label_head, upcast=True)


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (docs/architecture.md); accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "ffn_dim",
)


def _model_identity(model) -> dict:
    """The model's identity (for the classifier) and the config numbers FLOPs counts need."""
    cfg = model.config
    numbers = {k: getattr(cfg, k) for k in _CONFIG_KEYS if isinstance(getattr(cfg, k, None), (int, str))}
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "config": numbers,
    }


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _prefix_shareable(tokenizer, prefix: str, prefix_ids: list[int], suffix_ids: list[list[int]], suffixes) -> bool:
    """True when ``tokenizer(prefix + s) == tokenizer(prefix) + tokenizer(s)`` for every suffix."""
    if not prefix or not prefix_ids:
        return False
    for s, ids in zip(suffixes, suffix_ids, strict=True):
        if list(tokenizer(prefix + s).input_ids) != prefix_ids + ids:
            return False
    return True


@torch.inference_mode()
def collect_features(
    model,
    tokenizer,
    prefix: str,
    suffixes: list[str],
    labels: np.ndarray | None,
    label_token_ids: tuple[int, ...] | list[int],
    *,
    batch_size: int = 16,
    full_vocab: bool = True,
    keep_hidden: bool = False,
    share_prefix: bool | None = None,
    progress: bool = True,
    desc: str = "features",
    meta: dict | None = None,
) -> LayerFeatures:
    """One pass of the (unpatched) model over ``prefix + suffix`` prompts, per-layer features.

    Args:
        model: a ``LlamaForCausalLM`` / ``OPTForCausalLM`` in eval mode.
        tokenizer: its tokenizer (a pad token is needed for batches; EOS is used when missing).
        prefix: text shared by every prompt ("" for none).
        suffixes: the per-example rest of each prompt.
        labels: (N,) gold label indices, or None.
        label_token_ids: (K,) token ids of the label words.
        batch_size: prompts per forward pass.
        full_vocab: also compute the full-vocabulary signals (one d x V product per row and layer).
        keep_hidden: keep the raw last-token hidden states of layers 1..L-1 (for probes;
            N * (L-1) * d * 4 bytes).
        share_prefix: run the prefix once and reuse its K/V cache; None = when the tokenizer splits
            every prompt at the prefix boundary (checked), else whole prompts.
        progress: show a tqdm bar.

    Returns:
        LayerFeatures with N = len(suffixes) rows.
    """
    from tqdm.auto import tqdm

    from adainfer.models import lens_head

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        # range(0, n, -1) is empty: no batch would run and every feature would stay 0
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(suffixes)
    n_layers = int(model.config.num_hidden_layers)
    label_ids = torch.as_tensor(list(label_token_ids), dtype=torch.int64)
    head = lens_head(model) if full_vocab else None
    label_head = lens_head(model, vocab_subset=label_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    prefix_ids = list(tokenizer(prefix).input_ids) if prefix else []
    suffix_ids = [list(tokenizer(s, add_special_tokens=False).input_ids) for s in suffixes]
    if share_prefix is None:
        share_prefix = _prefix_shareable(tokenizer, prefix, prefix_ids, suffix_ids, suffixes)
    elif share_prefix and not _prefix_shareable(tokenizer, prefix, prefix_ids, suffix_ids, suffixes):
        raise ValueError("share_prefix=True but the tokenizer does not split these prompts at the prefix")
    if share_prefix:
        rows = suffix_ids
        p_len = len(prefix_ids)
        kw = _cache_kwarg(model)
        out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
        prefix_cache = getattr(out, kw, None)
        if prefix_cache is None:
            prefix_cache = out.past_key_values
        lengths = np.array([p_len + len(s) for s in rows], dtype=np.int64)
    else:
        rows = [list(tokenizer(prefix + s).input_ids) for s in suffixes]
        p_len = 0
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
    if min((len(r) for r in rows), default=1) == 0:
        raise ValueError("an empty prompt cannot be decoded")

    k = len(label_ids)
    label_logits = np.zeros((n, n_layers, k), dtype=np.float32)
    v_top = np.zeros((n, n_layers), dtype=np.float32) if full_vocab else None
    v_gap = np.zeros((n, n_layers), dtype=np.float32) if full_vocab else None
    v_arg = np.zeros((n, n_layers), dtype=np.int64) if full_vocab else None
    hidden = np.zeros((n, n_layers - 1, int(model.config.hidden_size)), dtype=np.float32) if keep_hidden else None

    order = np.argsort([-len(r) for r in rows], kind="stable")  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        ids, mask = _left_pad([rows[i] for i in idx], pad_id)
        # Positions count real tokens only (what generate() does): padding never shifts a prompt.
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + p_len
        kwargs = {}
        if share_prefix:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            kwargs[kw] = cache
            mask = torch.cat([torch.ones((len(idx), p_len), dtype=mask.dtype), mask], dim=1)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            output_hidden_states=True,
            use_cache=share_prefix,
            logits_to_keep=1,
            **kwargs,
        )
        states = out.hidden_states
        if len(states) != n_layers + 1:
            raise RuntimeError(f"expected {n_layers + 1} hidden states, got {len(states)}")
        for layer in range(1, n_layers):
            if hidden is not None:
                hidden[idx, layer - 1] = states[layer][:, -1, :].float().cpu().numpy()
            signals, z = _decode_layer(states[layer][:, -1, :], head, label_head)
            label_logits[idx, layer - 1] = z.float().cpu().numpy()
            if signals is not None:
                v_top[idx, layer - 1] = signals.top_prob.cpu().numpy()
                v_gap[idx, layer - 1] = signals.gap.cpu().numpy()
                v_arg[idx, layer - 1] = signals.argmax.cpu().numpy()
        # Layer L: the model's own logits (its last hidden state is already final-normed).
        logits = out.logits[:, -1, :].float()
        label_logits[idx, n_layers - 1] = logits[:, label_ids.to(logits.device)].cpu().numpy()
        if full_vocab:
            top, gap, pos_ = signals_from_logits(logits)
            v_top[idx, -1], v_gap[idx, -1], v_arg[idx, -1] = top.cpu().numpy(), gap.cpu().numpy(), pos_.cpu().numpy()

    return LayerFeatures(
        label_logits=label_logits,
        labels=np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64),
        label_token_ids=label_ids.numpy(),
        prompt_lengths=lengths,
        vocab_top_prob=v_top,
        vocab_gap=v_gap,
        vocab_argmax=v_arg,
        hidden=hidden,
        meta={**_model_identity(model), "shared_prefix": bool(share_prefix), **(meta or {})},
    )


def collect_task_features(model, rendered, split: str, **kwargs) -> LayerFeatures:
    """``collect_features`` over one split of a :class:`adainfer.app.tasks.RenderedTask`."""
    kwargs.setdefault("desc", split)
    meta = {"task": rendered.task.name, "split": split, **kwargs.pop("meta", {})}
    return collect_features(
        model,
        rendered.tokenizer,
        rendered.prefix,
        rendered.suffixes(split),
        rendered.labels(split),
        rendered.label_token_ids,
        meta=meta,
        **kwargs,
    )


def collect_content_free(model, rendered, **kwargs) -> LayerFeatures:
    """Features of the content-free prompts ("N/A", "", "[MASK]") of contextual calibration."""
    kwargs.setdefault("desc", "content-free")
    kwargs.setdefault("full_vocab", False)
    return collect_features(
        model,
        rendered.tokenizer,
        rendered.prefix,
        rendered.content_free_suffixes(),
        None,
        rendered.label_token_ids,
        meta={"task": rendered.task.name, "split": "content-free"},
        **kwargs,
    )
