"""``make test-vllm`` sets ADAINFER_VLLM_REFERENCE (the HF runtime's answers, ``bench/vllm_reference.py``):
there, vLLM must import (a skip would hide a broken venv); elsewhere (``make test`` in .venv) the
modules skip themselves."""

import json
import os
from pathlib import Path

import pytest

if os.environ.get("ADAINFER_VLLM_REFERENCE"):
    import vllm  # noqa: F401


@pytest.fixture(scope="session")
def ref() -> dict:
    """The reference: prompts, the classifiers, the HF runtime's answers and exit layers."""
    path = os.environ.get("ADAINFER_VLLM_REFERENCE")
    if not path or not Path(path).is_file():
        pytest.fail("ADAINFER_VLLM_REFERENCE must name the HF runtime's reference JSON: run `make test-vllm`")
    return json.loads(Path(path).read_text())
