"""Reversible monkey-patches that install the early-exit layer loop into a HF model instance.

    handle = adainfer.apply(model, classifier)          # or a policy: ForcedExits, NeverExit, ...
    out = model(**batch); model.generate(**batch)       # the same calls as before
    handle.last_stats.exit_layers                       # per-row exit layers of the last call
    handle.remove()                                     # or: with adainfer.patched(model, clf): ...

How it hooks in: the model's decoder forward (``LlamaModel.forward``, ``OPTDecoder.forward``, ...;
the family's ``decoder``) is wrapped on the instance to validate the call and start a pass of the
``LayerLoop``; while it runs, in that thread, its layer list yields the pass's L steps instead of
the L layers, so Hugging Face's own embedding, cache, mask, rotary and final-norm code run
unchanged around our loop. Nothing else is
touched: weights, state dict, parameters and the class stay as they are.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import types
from collections import deque
from collections.abc import Iterator

import torch
from torch import nn

from adainfer.models import ModelFamily, family_for, lens_head
from adainfer.runtime.answers import deliver_answers
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.loop import LayerLoop, LayerPass
from adainfer.runtime.policy import ClassifierPolicy, ExitPolicy
from adainfer.runtime.stats import ExitStats

# transformers releases whose decoder loop and cache API the patch was written against:
# 5.0 - 5.23 pass `past_key_values=`, 5.24+ pass `cache=` (the old name is accepted until 5.40).
TRANSFORMERS_RANGE = ((5, 0), (5, 40))
_ATTR = "_adainfer_handle"


def _check_transformers_version() -> None:
    import transformers

    parts = transformers.__version__.split(".")
    version = (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0))
    lo, hi = TRANSFORMERS_RANGE
    if not lo <= version < hi:
        raise RuntimeError(
            f"transformers {transformers.__version__} is not supported by the AdaInfer patch "
            f"(supported: >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}); install e.g. transformers==5.24.0"
        )


def _check_attention(family: ModelFamily, config) -> None:
    """Refuse attention kinds whose masks cannot be compacted row-wise (flex's BlockMask, ...)."""
    attn = getattr(config, "_attn_implementation", None)
    if attn not in family.attention:
        raise ValueError(
            f"attention implementation {attn!r} is not supported by the AdaInfer patch for {family.model_type} "
            f"(supported: {', '.join(family.attention)}); load the model with attn_implementation='sdpa'"
        )


def _unbound_signature(bound) -> inspect.Signature:
    """The signature of a bound method with a leading ``self``, for a function bound in its place."""
    sig = inspect.signature(bound)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return sig.replace(parameters=[self_param, *sig.parameters.values()])


class _LoopLayers(nn.ModuleList):
    """The decoder's layer list, which yields the steps of the running pass while a patched forward runs.

    Llama's decoder iterates ``self.layers[: num_hidden_layers]`` and OPT's ``enumerate(self.layers)``;
    both see the L steps of the pass then (``runtime.loop``). Indexing, ``len`` and iteration outside
    a forward, or in another thread, are unchanged.
    """

    def __getitem__(self, idx):
        handle = self.__dict__.get(_ATTR)
        layer_pass = handle._pass() if handle is not None else None
        if isinstance(idx, slice) and layer_pass is not None:
            if idx.step not in (None, 1) or (idx.start or 0) != 0 or (idx.stop is not None and idx.stop < len(self)):
                raise RuntimeError(f"the AdaInfer loop runs all layers; the decoder asked for layers[{idx}]")
            return list(layer_pass.steps)
        return super().__getitem__(idx)

    def __iter__(self):
        handle = self.__dict__.get(_ATTR)
        layer_pass = handle._pass() if handle is not None else None
        if layer_pass is not None:
            return iter(layer_pass.steps)
        return super().__iter__()


class AdaInferHandle:
    """A patched model: its exit statistics, and ``remove()`` to restore it bit for bit.

    What the patched model returns (the exit answer, delivered):
    - A row that runs every layer gets the unpatched model's logits, bit for bit (with
      ``AdaInferConfig(correct_full_depth=True)``: its label answer is corrected as an exited row's).
    - A row that stops at layer k < L: its hidden state is frozen there and decoded through the
      model's own final norm and LM head (the logit lens). When the policy answers over a task's
      label tokens (a classifier in label mode), the row's **last-position** logits are replaced by
      the exit answer: the label tokens hold the log-probabilities the exit head gave them (with
      that layer's label bias) and every other token -inf. So the label-token argmax, the softmax
      over the vocabulary and ``generate(max_new_tokens=1)`` all read the exit answer.
    - ``last_stats`` (``ExitStats``) holds each row's exit layer, answer token, answer probability,
      and in label mode its label index and label log-probabilities.

    ``history`` holds the ``ExitStats`` of the last ``config.history`` forward calls (default 1024;
    in ``generate`` one per step), oldest first; ``last_stats`` is the newest.
    """

    def __init__(self, model: nn.Module, policy: ExitPolicy, config: AdaInferConfig) -> None:
        self.model = model
        self.config = config
        self.policy = policy
        self.family = family_for(model)
        self.loop = LayerLoop(model, self.family, policy, config, lens_head(model))
        # The last ``config.history`` calls' statistics, oldest dropped first (bounded: a server
        # calls forward for ever). A sequence: len(), indexing and iteration as before.
        self.history: deque[ExitStats] = deque(maxlen=config.history)
        self.enabled = config.enabled
        self._local = threading.local()  # the pass running in this thread, if any
        self._inner = self.family.decoder(model)
        self._layers = self.family.layers(model)
        self._saved_forward = self._inner.__dict__.get("forward")
        self._saved_model_forward = model.__dict__.get("forward")
        self._saved_generate = model.__dict__.get("generate")

    def _pass(self) -> LayerPass | None:
        return getattr(self._local, "layer_pass", None)

    def _final_label_bias(self) -> torch.Tensor | None:
        """The correction applied to full-depth answers, or None (the model's own answer)."""
        if not self.config.correct_full_depth:
            return None
        bias = self.policy.final_label_bias(self.loop.num_layers)
        return None if bias is None else torch.as_tensor(bias, dtype=torch.float32)

    @property
    def last_stats(self) -> ExitStats | None:
        """Statistics of this thread's last forward call (in ``generate``: the last step).

        Thread-safety: one patched model may be called from several threads at once (a server's
        pool): each call runs its own pass and ``last_stats`` is per thread; ``history`` collects
        every thread's calls in completion order; ``enabled`` and ``remove()`` affect all threads
        (do not remove the patch while another thread runs the model)."""
        stats = getattr(self._local, "last_stats", None)
        if stats is not None:
            return stats
        return self.history[-1] if self.history else None

    def reset_stats(self) -> None:
        self.history.clear()
        self._local.last_stats = None

    @property
    def checked_layers(self) -> frozenset[int]:
        return self.loop.checked

    # -- installing and removing -------------------------------------------------------------
    def _original_forward(self):
        """The decoder's forward as it was before the patch, bound to the decoder."""
        if self._saved_forward is not None:
            return self._saved_forward
        return type(self._inner).forward.__get__(self._inner)

    def _original_model_forward(self):
        if self._saved_model_forward is not None:
            return self._saved_model_forward
        return type(self.model).forward.__get__(self.model)

    def _original_generate(self):
        if self._saved_generate is not None:
            return self._saved_generate
        return type(self.model).generate.__get__(self.model)

    def _in_generate(self) -> bool:
        return getattr(self._local, "generate_depth", 0) > 0

    def _generate(self, args, kwargs):
        """``model.generate`` with the exits: the decoding set-ups the exits cannot serve are refused
        here, before the first token, and the forwards it makes are known to come from it."""
        if self.enabled:
            _check_generate_call(self.model, kwargs)
        self._local.generate_depth = getattr(self._local, "generate_depth", 0) + 1
        try:
            return self._original_generate()(*args, **kwargs)
        finally:
            self._local.generate_depth -= 1

    def _decoder_forward(self, args, kwargs):
        original = self._original_forward()
        if not self.enabled:
            return original(*args, **kwargs)
        self._validate_call(args, kwargs)
        layer_pass = self.loop.start()
        self._local.layer_pass = layer_pass
        try:
            out = original(*args, **kwargs)
        finally:
            self._local.layer_pass = None
        if not layer_pass.complete:
            raise RuntimeError(
                f"the decoder ran {layer_pass.steps_run} of {self.loop.num_layers} layers: the AdaInfer loop "
                "needs every layer to run once per forward"
            )
        self.history.append(layer_pass.stats)
        self._local.last_stats = layer_pass.stats
        self._local.finished_pass = layer_pass
        return out

    def _model_forward(self, args, kwargs):
        self._local.finished_pass = None
        out = self._original_model_forward()(*args, **kwargs)
        layer_pass = getattr(self._local, "finished_pass", None)
        self._local.finished_pass = None
        if layer_pass is not None and getattr(out, "logits", None) is not None:
            out.logits = deliver_answers(layer_pass.stats, out.logits, self._final_label_bias())
        return out

    def _install(self) -> None:
        # The wrappers find their handle through the module they are bound to (never a closure):
        # a deep copy of the model then runs its own copied handle, weights and layers.
        def forward(inner_self, *args, **kwargs):
            return inner_self.__dict__[_ATTR]._decoder_forward(args, kwargs)

        def model_forward(model_self, *args, **kwargs):
            return model_self.__dict__[_ATTR]._model_forward(args, kwargs)

        def generate(model_self, *args, **kwargs):
            return model_self.__dict__[_ATTR]._generate(args, kwargs)

        original = self._original_forward()
        original_model = self._original_model_forward()
        # generate() and our own callers read the forward's signature (logits_to_keep, cache=...):
        # the wrappers show the originals' signatures.
        forward.__signature__ = _unbound_signature(original)
        model_forward.__signature__ = _unbound_signature(original_model)
        original_generate = self._original_generate()
        generate.__signature__ = _unbound_signature(original_generate)
        generate.__doc__ = original_generate.__doc__
        self._inner.forward = types.MethodType(forward, self._inner)
        self.model.forward = types.MethodType(model_forward, self.model)
        self.model.generate = types.MethodType(generate, self.model)
        self._layers.__class__ = _LoopLayers
        self._layers.__dict__[_ATTR] = self
        self._inner.__dict__[_ATTR] = self
        self.model.__dict__[_ATTR] = self

    def __deepcopy__(self, memo):
        """A deep copy of a patched model is patched on its own copied weights, with fresh stats."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_local":
                new._local = threading.local()
            elif key == "history":
                new.history = type(value)() if not hasattr(value, "maxlen") else type(value)(maxlen=value.maxlen)
            else:
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def remove(self) -> None:
        """Undo the patch: the model runs its original code again."""
        if self.model.__dict__.get(_ATTR) is not self:
            raise RuntimeError("this AdaInfer handle is not installed on the model (already removed?)")
        if self._saved_forward is not None:
            self._inner.forward = self._saved_forward
        else:
            del self._inner.forward
        if self._saved_model_forward is not None:
            self.model.forward = self._saved_model_forward
        else:
            del self.model.forward
        if self._saved_generate is not None:
            self.model.generate = self._saved_generate
        else:
            del self.model.generate
        self._layers.__class__ = nn.ModuleList
        del self._layers.__dict__[_ATTR]
        self._inner.__dict__.pop(_ATTR, None)
        del self.model.__dict__[_ATTR]

    # -- per-call validation -----------------------------------------------------------------
    def _validate_call(self, args, kwargs) -> None:
        cfg = self.model.config
        _refuse_layer_outputs(lambda flag: kwargs.get(flag, getattr(cfg, flag, False)), "")
        _check_attention(self.family, cfg)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() and not bool(mask[:, -1].all()):
            raise ValueError(
                "AdaInfer decides on the last position of each row, but some rows end in padding: "
                "use left padding (tokenizer.padding_side = 'left')"
            )
        # Inside generate (and in any step that continues a cached sequence) a row ending in the pad
        # token without a mask is legal: Hugging Face drops all-ones masks and feeds pad_token_id to
        # finished rows, whose outputs it then discards. Only a fresh forward can hide padding there.
        if mask is None and not self._in_generate() and _cached_length(kwargs) == 0:
            _check_unmasked_padding(kwargs.get("input_ids", args[0] if args else None), self.model)


def _cached_length(kwargs) -> int:
    """Tokens already in the cache a decoder forward was handed (0: none, or no cache)."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _check_generate_call(model: nn.Module, kwargs) -> None:
    """Refuse, before the first token, the ``generate`` set-ups the exits cannot serve."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name):
        return kwargs.get(name, getattr(config, name, None))

    _refuse_layer_outputs(setting, "generate(..., ")
    # Each generated token's exit is decided on its own position, once. Assisted decoding verifies
    # several draft tokens in one forward (their exits would all be decided on the last draft) and
    # a chunked prefill runs forwards that end mid-prompt (an exit decided on a prompt token).
    several = {
        "assistant_model": kwargs.get("assistant_model"),
        "prompt_lookup_num_tokens": setting("prompt_lookup_num_tokens"),
        "assistant_early_exit": setting("assistant_early_exit"),
        "prefill_chunk_size": setting("prefill_chunk_size"),
    }
    for name, value in several.items():
        if value is not None:
            raise ValueError(
                f"generate(..., {name}=...) is not supported while AdaInfer exits are enabled: it runs forwards "
                "whose last position is not the token being generated, and AdaInfer decides each token's exit "
                f"on that token's own position; {_ESCAPE_HATCH}"
            )


_ESCAPE_HATCH = "set handle.enabled = False for that call, or remove the patch"


def _refuse_layer_outputs(setting, call: str) -> None:
    """Per-layer outputs (``setting(flag)`` true for output_attentions / output_hidden_states) are
    refused: rows leave the batch at different layers. ``call`` prefixes the flag in the message."""
    for flag in ("output_attentions", "output_hidden_states"):
        if setting(flag):
            raise ValueError(
                f"{call}{flag}=True is not supported while AdaInfer exits are enabled (rows leave the batch "
                f"at different layers); {_ESCAPE_HATCH}"
            )


def _check_unmasked_padding(input_ids, model: nn.Module) -> None:
    """Refuse rows that end in the pad token when no attention mask says whether it is padding:
    the exit decision would be taken on it silently (e.g. right-padded batches without a mask). Only
    the model's own pad token ids are known here: padding with another id (lm-eval's HFLM pads with 0
    whatever the pad token) is not detected."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        return
    pad_ids = {getattr(model.config, "pad_token_id", None)}
    pad_ids.add(getattr(getattr(model, "generation_config", None), "pad_token_id", None))
    pad_ids = sorted(int(p) for p in pad_ids if isinstance(p, int))
    if not pad_ids:
        return
    last = input_ids[:, -1]
    rows = torch.isin(last, torch.tensor(pad_ids, device=last.device)).nonzero().flatten().tolist()
    if rows:
        raise ValueError(
            f"row(s) {rows[:8]} end in the pad token (id {pad_ids}) and no attention_mask was given: AdaInfer "
            "decides on each row's last position, which may be padding. Pass the attention_mask "
            "(tokenizer(texts, padding=True, return_tensors='pt') returns it; pad on the left), or "
            "attention_mask=torch.ones_like(input_ids) when that token is real input"
        )


def _as_policy(classifier_or_policy, config: AdaInferConfig) -> ExitPolicy:
    if hasattr(classifier_or_policy, "should_stop"):
        return classifier_or_policy
    if hasattr(classifier_or_policy, "stop_rule"):
        return ClassifierPolicy(classifier_or_policy)
    raise TypeError(
        "expected a StopClassifier (with stop_rule/label_bias_at/vocab_subset) or an exit policy "
        f"(ForcedExits, NeverExit, ...), got {type(classifier_or_policy).__name__}"
    )


def apply(model: nn.Module, classifier_or_policy, config: AdaInferConfig | None = None) -> AdaInferHandle:
    """Patch ``model`` (``LlamaForCausalLM`` or ``OPTForCausalLM``) in place; returns the handle.

    Args:
        model: the model instance to patch (its class and other instances are not touched).
        classifier_or_policy: a fitted ``StopClassifier`` (AdaInfer) or an exit policy.
        config: which layers are checked, compact or mask mode (default: ``AdaInferConfig()``).

    Raises:
        ValueError: unsupported model type or attention implementation, a classifier fitted on
            another model, or a model that is already patched.
        RuntimeError: an unsupported transformers version.
    """
    _check_transformers_version()
    family = family_for(model)
    if _ATTR in model.__dict__:
        raise ValueError("this model is already patched by AdaInfer: call handle.remove() (or adainfer.remove) first")
    _check_attention(family, model.config)
    if hasattr(classifier_or_policy, "check_compatible"):
        classifier_or_policy.check_compatible(model)
    if type(family.layers(model)) is not nn.ModuleList:
        raise ValueError("the model's decoder layers are not a plain nn.ModuleList: cannot patch it")
    config = config or AdaInferConfig()
    handle = AdaInferHandle(model, _as_policy(classifier_or_policy, config), config)
    handle._install()
    return handle


def remove(model: nn.Module) -> None:
    """Undo ``apply`` on ``model``."""
    handle = model.__dict__.get(_ATTR)
    if handle is None:
        raise ValueError("this model is not patched by AdaInfer")
    handle.remove()


def handle_of(model: nn.Module) -> AdaInferHandle | None:
    """The handle of a patched model, or None."""
    return model.__dict__.get(_ATTR)


@contextlib.contextmanager
def patched(model: nn.Module, classifier_or_policy, config: AdaInferConfig | None = None) -> Iterator[AdaInferHandle]:
    """``with patched(model, clf) as handle: ...`` applies the patch and always removes it."""
    handle = apply(model, classifier_or_policy, config)
    try:
        yield handle
    finally:
        handle.remove()
