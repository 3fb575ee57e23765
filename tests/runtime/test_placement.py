"""Models whose parts are offloaded by accelerate's hooks (device_map with "cpu"/"disk", cpu_offload):
the exit head, compaction and the K/V fill load an offloaded part's weights only for the call that
needs them, and a patched offloaded model computes exactly what the same model computes in memory.
(A CPU + CUDA split runs in bench/gpu_check.sh when a GPU is lent.)"""

from __future__ import annotations

import adainfer
import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.utils import offload_state_dict
from adainfer import ForcedExits, NeverExit, StopRulePolicy
from adainfer.runtime.placement import container_hooks_within, modules_owning
from tiny_models import left_padded_batch, run_configs, tiny_family, tiny_llama, tiny_opt

from adainfer_kernels.head import StopRule

GEN = {"max_new_tokens": 5, "do_sample": False}
BUILDERS = {
    "llama": lambda: tiny_llama("sdpa"),
    "opt-post-ln": lambda: tiny_opt(True, "sdpa"),  # project_out in the exit head
    "qwen3": lambda: tiny_family("qwen3", "sdpa"),  # k_norm in the K/V fill
}
# Every row stops by layer 2 in the second pattern: layers 3-4 only fill K/V, through the offload hooks.
PATTERNS = ([2, 4, 1, 3], [1, 1, 2, 1])


def _offload(name: str, how: str, tmp_path):
    model = BUILDERS[name]()
    if how == "cpu_offload":  # a hook on every leaf: weights are loaded when the leaf runs
        cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "preload":  # one hook per decoder layer that places all its submodules at once
        layer_cls = type(model.model.decoder.layers[0] if name.startswith("opt") else model.model.layers[0]).__name__
        cpu_offload(model, execution_device=torch.device("cpu"), preload_module_classes=[layer_cls])
    else:  # a device_map with every other layer and the LM head on "disk", the rest on "cpu"
        decoder = model.model.decoder if name.startswith("opt") else model.model
        prefix = "model.decoder." if name.startswith("opt") else "model."
        device_map = {}
        for child, module in decoder.named_children():
            if child == "layers":
                device_map |= {f"{prefix}layers.{i}": "disk" if i % 2 else "cpu" for i in range(len(module))}
            elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                device_map[prefix + child] = "cpu"
        device_map["lm_head"] = "disk"
        if model.config.tie_word_embeddings:  # a tied LM head goes where its embedding goes
            device_map[prefix + "embed_tokens"] = "disk"
        on_disk = tuple(k + "." for k, v in device_map.items() if v == "disk")
        offload_state_dict(str(tmp_path), {k: v for k, v in model.state_dict().items() if k.startswith(on_disk)})
        model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.get_output_embeddings().weight.device.type == "meta", "the LM head must really be offloaded"
    return model


def _runs(model, batch, policy, config=None):
    with torch.inference_mode(), adainfer.patched(model, policy, config) as handle:
        logits = model(**batch).logits
        exits = handle.last_stats.exit_layers.clone()
        tokens = model.generate(**batch, **GEN)
    return logits, exits, tokens


@pytest.mark.parametrize("how", ["cpu_offload", "preload", "device_map"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_offloaded_model_patched_equals_the_model_in_memory(name, how, tmp_path):
    batch = left_padded_batch(4, 9, pad_id=BUILDERS[name]().config.pad_token_id)
    in_memory = BUILDERS[name]()
    offloaded = _offload(name, how, tmp_path)
    layers = range(1, in_memory.config.num_hidden_layers)
    with torch.inference_mode():
        ref_logits = in_memory(**batch).logits
        assert torch.equal(offloaded(**batch).logits, ref_logits)
    got = _runs(offloaded, batch, NeverExit(layers))
    assert torch.equal(got[0], ref_logits), "checks on an offloaded model change nothing"
    for exits in PATTERNS:
        for mode, config in run_configs().items():
            want = _runs(in_memory, batch, ForcedExits(exits), config)
            got = _runs(offloaded, batch, ForcedExits(exits), config)
            assert got[1].tolist() == exits
            assert torch.equal(got[0], want[0]), f"{mode} {exits}: logits"
            assert torch.equal(got[2], want[2]), f"{mode} {exits}: generated tokens"


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_score_policy_on_an_offloaded_head_decides_like_the_model_in_memory(how, tmp_path):
    """The exit head itself (label subset, score) is read off the offloaded LM head at each check."""
    batch = left_padded_batch(6, 9)
    score = StopRule(w_top_prob=4.0, w_gap=0.0, offset=-1.5)  # stops rows whose top label prob > 0.375
    policy = lambda: StopRulePolicy(score, layers=[1, 2, 3], label_token_ids=[5, 17, 40])
    want = _runs(tiny_llama("sdpa"), batch, policy())
    offloaded = _offload("llama", how, tmp_path)
    got = _runs(offloaded, batch, policy())
    assert 0 < int((want[1] < 4).sum()) < 6, f"the test needs some rows to stop early and some not: {want[1]}"
    assert got[1].tolist() == want[1].tolist()
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert all(p.device.type == "meta" for p in offloaded.lm_head.parameters()), "the head is offloaded again"


def test_placement_helpers_find_what_the_hooks_hold():
    model = tiny_llama("sdpa")
    assert modules_owning(model, [model.lm_head.weight]) == [], "no hooks: nothing to load"
    cpu_offload(model, execution_device=torch.device("cpu"), preload_module_classes=["LlamaDecoderLayer"])
    assert modules_owning(model, [model.lm_head.weight]) == [model.lm_head]
    layer = model.model.layers[0]
    assert container_hooks_within(layer) == [layer], "the preloading hook sits on the layer, not its leaves"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cpu_cuda_split_matches_one_device(name):
    """Layers on two devices (embeddings and even layers on CUDA, odd layers and the head on the CPU):
    exits, generated tokens and logits match the model on the CPU alone (to GEMM rounding)."""
    batch = left_padded_batch(4, 9, pad_id=BUILDERS[name]().config.pad_token_id)
    model = BUILDERS[name]()
    decoder = model.model.decoder if name.startswith("opt") else model.model
    prefix = "model.decoder." if name.startswith("opt") else "model."
    device_map = {}
    for child, module in decoder.named_children():
        if child == "layers":
            device_map |= {f"{prefix}layers.{i}": 0 if i % 2 == 0 else "cpu" for i in range(len(module))}
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            device_map[prefix + child] = 0
    device_map["lm_head"] = 0 if model.config.tie_word_embeddings else "cpu"
    split = dispatch_model(BUILDERS[name](), device_map=device_map, main_device=0)
    for exits in PATTERNS:
        want = _runs(model, batch, ForcedExits(exits))
        got = _runs(split, {k: v.to(0) for k, v in batch.items()}, ForcedExits(exits))
        assert got[1].tolist() == exits
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(got[2].cpu(), want[2])
