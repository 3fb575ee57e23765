"""Where a model's parts live: models spread over devices or offloaded by accelerate's hooks.

A model loaded with ``device_map=...`` has its layers on several devices, and parts offloaded to
the CPU or disk carry accelerate hooks that load their weights (from a weights map) only while the
module runs; in between, those parameters are ``meta`` tensors. The runtime never moves a model's
weights: it moves the few rows it works on to where a part runs, and loads an offloaded part's
weights only for the call that needs them (``materialised``), exactly as the part's own forward does.
Without accelerate hooks every function here is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False))


def modules_owning(model: nn.Module, tensors: Iterable[torch.Tensor | None]) -> list[nn.Module]:
    """The offloaded modules whose hooks load ``tensors``: for each tensor's owner, the nearest module
    on its path from the root (the owner itself, or a container whose hook places its submodules)
    that carries an accelerate hook with ``offload``. Empty for a model without offloading."""
    wanted = {id(t) for t in tensors if t is not None}
    modules = dict(model.named_modules())
    out: dict[int, nn.Module] = {}
    for name, module in modules.items():
        if not any(id(p) in wanted for p in module.parameters(recurse=False)):
            continue
        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):
            candidate = modules[".".join(parts[:depth])]
            if _offloaded(candidate):
                out[id(candidate)] = candidate
                break
    return list(out.values())


@contextlib.contextmanager
def materialised(modules: list[nn.Module]) -> Iterator[None]:
    """Load the weights of offloaded ``modules`` for the duration of the block (their hooks'
    pre_forward / post_forward, as when the module runs)."""
    if not modules:
        yield
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(align_module_device(module))
        yield


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device, else where its first
    real (non-meta) parameter lives; None for a module without parameters."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    for sub in module.modules():
        sub_hook = getattr(sub, "_hf_hook", None)
        if getattr(sub_hook, "execution_device", None) is not None:
            return torch.device(sub_hook.execution_device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def container_hooks_within(module: nn.Module) -> list[nn.Module]:
    """Offloaded modules inside ``module`` (itself included) whose hooks load their *submodules'*
    weights: calling a submodule directly would bypass them. Leaf hooks need nothing: they load
    their weights whenever their module is called."""
    return [m for m in module.modules() if _offloaded(m) and not any(True for _ in m.parameters(recurse=False))]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)
