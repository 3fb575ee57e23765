"""Tiny random models of every supported family for the patch tests (no family but Llama has offline
weights here). Where a family has sliding-window layers, the window (4) is shorter than the test
sequences (9 tokens + generation), so the per-layer masks really differ."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 320


# The ways the runtime can run a batch with exits, compared against each other in generation
# tests (docs/architecture.md, "Decode"): compaction at every layer, compaction only once 3 rows
# have finished (the first layers after an exit run the finished rows frozen, in the same step),
# and mask mode. All three are the same computation.
def run_configs():
    from adainfer import AdaInferConfig

    return {
        "compact": AdaInferConfig(mode="compact", decode_compact_rows=1),
        "compact-routed": AdaInferConfig(mode="compact", decode_compact_rows=3),
        "mask": AdaInferConfig(mode="mask"),
    }


def tiny_llama(attn: str = "sdpa", dtype: torch.dtype = torch.float32, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_opt(post_ln: bool = False, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Pre-LN (125m-style) or post-LN with project_in/out and no final layer norm (350m-style)."""
    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        word_embed_proj_dim=32 if post_ln else 64,
        do_layer_norm_before=not post_ln,
        pad_token_id=1,
        attn_implementation=attn,
    )
    model = OPTForCausalLM(cfg).to(dtype).eval()
    if post_ln:
        assert model.model.decoder.project_out is not None and model.model.decoder.final_layer_norm is None
    return model


# Per family: what its tiny config sets beyond the shared sizes.
FAMILY_CONFIGS = {
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),  # q/k/v bias; 2 sliding layers
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=2),  # q/k norm
    "mistral": dict(sliding_window=4),
    "gemma": dict(head_dim=16),  # embedding scale, (1 + w) RMSNorm
    "gemma2": dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16),  # + soft-capping
    "phi3": dict(partial_rotary_factor=0.5),  # fused qkv, partial rotary
}


def tiny_family(name: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 4-layer random ``*ForCausalLM`` of family ``name`` (a key of FAMILY_CONFIGS)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        name,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **FAMILY_CONFIGS[name],
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype).eval()
    if name.startswith("gemma"):
        # Gemma initialises its norm weights to 0 ((1 + w) = 1): random ones exercise the (1 + w) numerics.
        with torch.no_grad():
            for mod in model.modules():
                if type(mod).__name__.endswith("RMSNorm"):
                    mod.weight.normal_(0.0, 0.3)
    return model


# Every supported family's tiny model by one name: Llama, OPT pre-LN (125m-style) and post-LN with
# project_in/out (350m-style), and the families of FAMILY_CONFIGS. Gemma2's soft-capped attention is
# eager-only in transformers.
TINY_MODELS = ("llama", "opt-pre-ln", "opt-post-ln", *FAMILY_CONFIGS)
EAGER_ONLY = frozenset({"gemma2"})


def tiny_model(name: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random model of ``name`` (one of TINY_MODELS)."""
    if name == "llama":
        return tiny_llama(attn, dtype, seed=seed)
    if name.startswith("opt-"):
        return tiny_opt(name == "opt-post-ln", attn, dtype, seed=seed)
    return tiny_family(name, attn, dtype, seed=seed)


def left_padded_batch(batch: int = 4, length: int = 9, seed: int = 1, pad_id: int = 0):
    """input_ids and attention_mask with a different amount of left padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(batch):
        pad = (r * 2) % (length - 2)
        mask[r, :pad] = 0
        ids[r, :pad] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def decode_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a raw (not final-normed) hidden state through the model's own decode path
    (its own modules: final norm, project_out, LM head, final-logit soft-capping)."""
    if model.config.model_type != "opt":
        logits = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap
    dec = model.model.decoder
    if dec.final_layer_norm is not None:
        hidden = dec.final_layer_norm(hidden)
    if dec.project_out is not None:
        hidden = dec.project_out(hidden)
    return model.lm_head(hidden)


# Words of the tiny model directory's tokenizer: the "user" and "plain" templates, the label words and
# the texts the CLI tests write (any other word is [UNK]).
TINY_WORDS = [
    "Classify",
    "each",
    "text",
    "as",
    "one",
    "of",
    ":",
    ",",
    ".",
    "Text",
    "Label",
    "Tweet",
    "Sentiment",
    "I",
    "like",
    "this",
    "neg",
    "pos",
    "bad",
    "good",
    "negative",
    "positive",
    "great",
    "awful",
    "product",
    "thing",
    "number",
    "review",
    "stars",
]


def save_tiny_model_dir(path, layers: int = 4, seed: int = 0):
    """A Hugging Face model directory (config, safetensors, tokenizer) of a tiny random Llama with a
    word-level tokenizer, for ``adainfer calibrate/eval --model DIR``: the CLI end to end in seconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[EOS]"]
    digits = [str(d) for d in range(10)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *TINY_WORDS, *digits]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", padding_side="left"
    )
    model = tiny_llama(layers=layers, seed=seed)
    model.config.pad_token_id = vocab["[PAD]"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def label_classifier(model, label_token_ids, label_words, bias_scale: float = 0.05):
    """A label-mode StopClassifier for a tiny model, built by hand: it stops a row when its top
    label probability (3 labels, with a small per-layer label bias) passes 0.4, from layer 1."""
    from adainfer.calibration.classifier import ModelIdentity, StopClassifier

    n_layers = model.config.num_hidden_layers
    return StopClassifier(
        identity=ModelIdentity.from_model(model),
        method="logreg",
        target="consistency",
        vocab_mode="labels",
        w_top_prob=4.0,
        w_gap=0.0,
        w_layer=0.0,
        intercept=-1.6,
        threshold=0.0,
        min_layer=1,
        label_token_ids=tuple(label_token_ids),
        label_words=tuple(label_words),
        label_bias=tuple((bias_scale * k, -bias_scale * k, 0.0) for k in range(1, n_layers + 1)),
        label_bias_estimator="mean",
    )


def _assert_every_step_exited_at(handle, exits: list[int], steps: int, what: str) -> None:
    """Each of the ``steps`` forward passes of a ``generate`` recorded exactly the forced exit layers."""
    assert len(handle.history) == steps, f"{what}: {len(handle.history)} forward passes recorded, {steps} tokens"
    for step, stats in enumerate(handle.history):
        assert stats.exit_layers.tolist() == exits, f"{what}, step {step}: exits {stats.exit_layers.tolist()}"
    assert handle.last_stats.exit_layers.tolist() == exits


def assert_rows_generate_as_alone(model, exits=(1, 3, 2), max_new_tokens: int = 6) -> None:
    """Forced exits are batch-invariant: each row of an unpadded batch generates, greedily, exactly
    what it generates alone (batch 1) with the same exit layer; in both runs every step's recorded exit
    layers (``ExitStats.exit_layers``) are the forced ones."""
    import adainfer
    from adainfer import ForcedExits

    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    batch = left_padded_batch(len(exits), 8)
    batch["attention_mask"][:] = 1  # no padding: the row alone sees the same positions
    prompt_len = batch["input_ids"].shape[1]
    name = model.config.model_type
    with adainfer.patched(model, ForcedExits(list(exits))) as handle:
        together = model.generate(**batch, **gen)
        _assert_every_step_exited_at(handle, list(exits), together.shape[1] - prompt_len, f"{name} batch")
    for row, k in enumerate(exits):
        single = {key: v[row : row + 1] for key, v in batch.items()}
        with adainfer.patched(model, ForcedExits([k])) as handle:
            alone = model.generate(**single, **gen)
            _assert_every_step_exited_at(handle, [k], alone.shape[1] - prompt_len, f"{name} row {row} alone")
        assert torch.equal(together[row], alone[0]), f"{name} row {row} (exit {k})"
