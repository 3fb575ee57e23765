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


def _package_imports(path: pathlib.Path, prefix: str) -> set[str]:
    """Modules under ``prefix`` that ``path`` imports (at any depth of the file: lazy imports count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith(prefix))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(prefix):
            names.add(node.module)
            # `from adainfer.app import plots` imports adainfer.app.plots
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


# Which wings of python/adainfer a wing may import (docs/architecture.md, "Module map").
WING_RULES = {
    "models": {"models"},
    "runtime": {"runtime", "models"},
    "calibrate": {"calibrate", "models"},
    "app": {"app", "calibrate", "runtime", "models"},
}


def test_wings_of_adainfer_import_only_what_the_layering_allows():
    root = ROOT / "python" / "adainfer"
    offenders = {}
    for wing, allowed in WING_RULES.items():
        for f in sorted((root / wing).rglob("*.py")):
            used = {m.split(".")[1] for m in _package_imports(f, "adainfer.") if m.count(".") >= 1}
            used &= set(WING_RULES)
            if used - allowed:
                offenders[str(f.relative_to(ROOT))] = sorted(used - allowed)
    assert not offenders, f"wings import across the layering: {offenders}"


def test_no_import_cycles_between_kernel_modules():
    files = {f"adainfer_kernels.{f.stem}": f for f in (ROOT / "adainfer_kernels").glob("*.py") if f.stem != "__init__"}
    graph = {m: {i for i in _package_imports(f, "adainfer_kernels.") if i in files} for m, f in files.items()}
    cycles = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert not cycles, f"kernel modules import each other: {cycles}"
