"""What a model family must say about itself so that the model-agnostic runtime can patch it.

One ``ModelFamily`` per Hugging Face ``model_type``, defined in that family's own module
(``llama.py``, ``opt.py``, ...) and registered in ``adainfer.models``. The layer loop, compaction
and checks never look at a model's type: everything type-specific is one of these fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adainfer_kernels.head import ReadoutHead

# (layer, hidden (F, T, d), position_embeddings (cos, sin) or None) -> K, V (F, H_kv, T, D)
KVFill = Callable[[nn.Module, torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ModelFamily:
    """How to reach one architecture's parts from its ``*ForCausalLM`` model.

    Attributes:
        model_type: ``config.model_type``.
        causal_lm: the class it patches (for messages), e.g. ``"LlamaForCausalLM"``.
        decoder: model -> the module whose ``forward`` runs the decoder-layer loop (it has ``.layers``).
        lens_head: model -> its ``ReadoutHead`` over the full vocabulary: the final norm with the
            model's numerics, ``project_out``, the LM head. Built from the live modules at each
            call, so it always decodes with the model's current weights.
        kv_fill: the K/V a decoder layer would have cached for rows that skipped it, computed from
            their frozen exit state exactly as that layer's attention computes them (norm,
            projections, bias, RoPE; CALM's "state propagation").
        attention: the ``attn_implementation`` values whose masks the runtime can compact row-wise.
    """

    model_type: str
    causal_lm: str
    decoder: Callable[[nn.Module], nn.Module]
    lens_head: Callable[[nn.Module], ReadoutHead]
    kv_fill: KVFill
    attention: tuple[str, ...] = ("eager", "sdpa")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder's ``nn.ModuleList`` of layers."""
        return self.decoder(model).layers


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(F, T, H*D) -> (F, H, T, D), as the attention modules reshape their projections."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(k: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Rotary embedding of keys (F, H, T, D) with the decoder's (cos, sin), as HF's ``apply_rotary_pos_emb``.

    When cos/sin cover fewer than D features (partial rotary, Phi-3), the first ``cos.shape[-1]``
    features rotate and the rest pass through, as in Phi-3's own function.
    """
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == k.shape[-1]:
        return (k * cos) + (rotate_half(k) * sin)
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    return torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
