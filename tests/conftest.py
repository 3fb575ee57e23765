"""Test-wide setup. TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, before test modules import kernel modules (docs/architecture.md: Triton without a GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch

# The shared helpers (tests/helpers: tiny models, synthetic features, lm-eval fixtures) are imported
# by name. Tests run with --import-mode=importlib, so that no test folder shadows the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from synthetic import LLAMA_LIKE, synthetic_features


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def record_classify(monkeypatch):
    """``record_classify()`` from then on records every call of ``adainfer.app.classify.classify``
    (the runtime's answers, as ``adainfer eval`` reads them) and returns the list it appends
    ``(prompts, result)`` to."""

    def install() -> list:
        import adainfer.app.classify

        calls = []
        real = adainfer.app.classify.classify

        def spy(model, tokenizer, prompts, *args, **kwargs):
            result = real(model, tokenizer, prompts, *args, **kwargs)
            calls.append((list(prompts), result))
            return result

        monkeypatch.setattr(adainfer.app.classify, "classify", spy)
        return calls

    return install


@pytest.fixture
def make_features():
    return synthetic_features


@pytest.fixture
def llama_like():
    return dict(LLAMA_LIKE)


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M (fp32, eval, left padding), loaded once."""
    from adainfer.app.loading import load_bundled

    return load_bundled()
