"""Per-architecture facts, as data: where the decoder layers live and how a skipped layer's K/V
are filled for a row that exited (CALM's "state propagation").

Everything else (the layer loop, compaction, checks) is model-agnostic (``runtime.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(F, T, H*D) -> (F, H, T, D), as the attention modules reshape their projections."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of a Llama layer for rows that skipped it: input norm -> k/v projections -> RoPE on K.

    Computes what ``LlamaAttention.forward`` computes for its keys and values from ``hidden``,
    with the same operations in the same order (so a row frozen at its exit state gets the same
    K/V whether it is compacted out or kept in the batch).
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = _heads(attn.k_proj(x), attn.head_dim)
    v = _heads(attn.v_proj(x), attn.head_dim)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    k = (k * cos) + (_rotate_half(k) * sin)
    return k, v


def _opt_kv_fill(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of an OPT layer for rows that skipped it (positions were added before the layers)."""
    attn = layer.self_attn
    x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    return _heads(attn.k_proj(x), attn.head_dim), _heads(attn.v_proj(x), attn.head_dim)


@dataclass(frozen=True)
class Arch:
    """How to reach an architecture's parts from its ``*ForCausalLM`` model.

    Attributes:
        model_type: ``config.model_type``.
        inner: the module whose ``forward`` runs the decoder-layer loop.
        layers: its ``nn.ModuleList`` of decoder layers.
        kv_fill: (layer, hidden (F, T, d), position_embeddings or None) -> K, V (F, H_kv, T, D).
    """

    model_type: str
    inner: Callable[[nn.Module], nn.Module]
    kv_fill: Callable

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.inner(model).layers


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", inner=lambda m: m.model, kv_fill=_llama_kv_fill),
    "opt": Arch("opt", inner=lambda m: m.model.decoder, kv_fill=_opt_kv_fill),
}


def arch_for(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHS))}); "
            "AdaInfer patches LlamaForCausalLM and OPTForCausalLM"
        )
    return ARCHS[model_type]
