"""Start-up refusals of the vLLM plugin, on vLLM's own engine configuration (no engine started)."""

from __future__ import annotations

import copy
import glob
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv: make test-vllm")

from adainfer.vllm import engine_args
from adainfer.vllm.settings import AdaInferStartupError, PluginSettings, check_engine
from vllm.engine.arg_utils import EngineArgs


@pytest.fixture(scope="module")
def model_dir() -> str:
    ref = os.environ.get("ADAINFER_VLLM_REFERENCE")
    if ref and Path(ref).is_file():
        return json.loads(Path(ref).read_text())["model_dir"]
    found = sorted(glob.glob(str(Path.home() / ".cache" / "adainfer" / "smollm2-135m-*")))
    if not found:
        pytest.fail("no safetensors copy of the bundled model: run `make test-vllm`")
    return found[-1]


@pytest.fixture(scope="module")
def served(model_dir):
    """The engine configuration ``engine_args`` asks for (eager; prefix caching as vLLM's default)."""
    kwargs = engine_args(None, exits="off")
    kwargs.pop("additional_config"), kwargs.pop("hf_overrides")
    return EngineArgs(model=model_dir, dtype="float32", max_model_len=2048, **kwargs).create_engine_config()


def test_the_served_configuration_passes(served):
    check_engine(served, "llama")


def test_settings_must_be_given_and_known(tmp_path):
    with pytest.raises(AdaInferStartupError, match="needs its settings"):
        PluginSettings.from_additional_config({})
    with pytest.raises(AdaInferStartupError, match="unknown adainfer settings"):
        PluginSettings.from_additional_config({"adainfer": {"classifer": "x"}})
    with pytest.raises(AdaInferStartupError, match="exits must be one of"):
        PluginSettings.from_additional_config({"adainfer": {"exits": "maybe"}})
    with pytest.raises(AdaInferStartupError, match="needs a classifier file"):
        PluginSettings.from_additional_config({"adainfer": {}})
    with pytest.raises(AdaInferStartupError, match="not found"):
        PluginSettings.from_additional_config({"adainfer": {"classifier": str(tmp_path / "none.json")}})
    assert PluginSettings.from_additional_config({"adainfer": {"exits": "off"}}).classifier is None


def test_compiled_layer_loops_are_refused(model_dir):
    compiled = EngineArgs(model=model_dir, dtype="float32", max_model_len=2048)
    with pytest.raises(AdaInferStartupError, match="--enforce-eager"):
        check_engine(compiled.create_engine_config(), "llama")


def test_unsupported_families_and_features_are_refused(served):
    with pytest.raises(AdaInferStartupError, match="drives \\['llama'\\] models; this one is 'qwen2'"):
        check_engine(served, "qwen2")
    spec = copy.copy(served)
    object.__setattr__(spec, "speculative_config", object())
    with pytest.raises(AdaInferStartupError, match="speculative decoding"):
        check_engine(spec, "llama")
    pp = copy.copy(served)
    object.__setattr__(pp, "parallel_config", copy.copy(served.parallel_config))
    object.__setattr__(pp.parallel_config, "pipeline_parallel_size", 2)
    with pytest.raises(AdaInferStartupError, match="pipeline parallel"):
        check_engine(pp, "llama")
