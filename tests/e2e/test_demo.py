"""`adainfer demo` on the bundled real model (offline)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_loads_the_bundled_model():
    out = subprocess.run([sys.executable, "-m", "adainfer.cli", "demo"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LlamaForCausalLM: 30 layers, hidden 576, vocab 49152" in out.stdout
