"""The README's vLLM example runs as written (in .venv-vllm, from a folder holding ``clf/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv: make test-vllm")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_vllm_example_runs_as_written(ref, tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "from vllm import" in b]
    assert len(blocks) == 1, "the README has one vLLM example"
    clf = Path(ref["classifier"]).parent
    (tmp_path / "clf").symlink_to(clf, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(blocks[0], "README.md vLLM block", "exec"), namespace)
    namespace["llm"].llm_engine.engine_core.shutdown()
    out = namespace["out"]
    exits = namespace["exits"][out.request_id]
    assert len(out.outputs[0].token_ids) == 1
    assert len(exits) == 1 and 1 <= exits[0] <= ref["num_layers"]
