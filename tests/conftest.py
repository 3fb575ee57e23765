"""Test-wide setup. TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, before test modules import kernel modules (docs/architecture.md: Triton without a GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
