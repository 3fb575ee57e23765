"""Tiny random Llama and OPT models for the patch tests (OPT has no offline weights)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 320


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
    """Logits of a raw (not final-normed) hidden state through the model's own decode path."""
    if model.config.model_type == "llama":
        return model.lm_head(model.model.norm(hidden))
    dec = model.model.decoder
    if dec.final_layer_norm is not None:
        hidden = dec.final_layer_norm(hidden)
    if dec.project_out is not None:
        hidden = dec.project_out(hidden)
    return model.lm_head(hidden)
