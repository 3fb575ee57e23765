"""The import direction is adainfer -> adainfer_kernels -> torch/triton, never the reverse."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("transformers", "adainfer")


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_kernels_package_source_never_imports_transformers_or_adainfer():
    files = sorted((ROOT / "adainfer_kernels").rglob("*.py"))
    assert files, "no source files found"
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_modules(f) & set(FORBIDDEN)) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"adainfer_kernels must not import {FORBIDDEN}: {offenders}"


def test_importing_kernels_package_loads_neither_at_run_time():
    code = (
        "import sys, adainfer_kernels, adainfer_kernels.reference, adainfer_kernels.compaction;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'adainfer')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
