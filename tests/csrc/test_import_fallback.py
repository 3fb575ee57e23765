"""Both packages import with no GPU, no Triton and no compiled _C: one warning, then fallbacks."""

import json
import subprocess
import sys

BLOCKER = """
import importlib.abc, sys, warnings, json
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'triton' or name.startswith('triton.') or name == 'adainfer_kernels._C':
            raise ImportError(f'blocked for the test: {name}')
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] == 'triton' else _find_spec(n, *a)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import adainfer_kernels, adainfer
    import adainfer_kernels.backend as backend
    import adainfer_kernels.compaction as compaction
import torch
res = compaction.compact_rows(torch.tensor([True, False, True]), torch.arange(3), [torch.arange(6).view(3, 2)])
print(json.dumps({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "compaction": backend.compaction_backend('cpu').name,
    "exit_head_cpu": backend.exit_head_backend('cpu').name,
    "exit_head_cuda": backend.exit_head_backend('cuda').name,
    "triton": backend.triton_available(),
    "rows": res.row_map.tolist(),
}))
"""


def test_imports_without_triton_and_without_native_extension():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "adainfer_kernels._C is unavailable" in result["warnings"][0]
    assert result["compaction"] == "torch"
    assert result["exit_head_cpu"] == "cpu"
    assert result["exit_head_cuda"] == "reference"
    assert result["triton"] is False
    assert result["rows"] == [0, 2]


def test_forced_reference_backend(monkeypatch):
    from adainfer_kernels import backend

    monkeypatch.setenv("ADAINFER_BACKEND", "reference")
    assert backend.exit_head_backend("cpu").name == "reference"
    assert backend.compaction_backend("cpu").name == "reference"
    monkeypatch.setenv("ADAINFER_BACKEND", "fastest")
    try:
        backend.forced()
    except ValueError as exc:
        assert "ADAINFER_BACKEND='fastest' is not valid" in str(exc)
    else:
        raise AssertionError("an invalid ADAINFER_BACKEND must be refused")
