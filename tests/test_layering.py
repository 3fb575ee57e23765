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
    "calibration": {"calibration", "models"},
    "app": {"app", "calibration", "runtime", "models"},
    "vllm": {"vllm", "runtime", "calibration", "models"},  # the vLLM adapter: nothing imports it
}


def test_only_the_vllm_wing_imports_vllm():
    """vLLM is an optional extra in its own venv: no other module may import it (at any depth)."""
    files = sorted((ROOT / "python" / "adainfer").rglob("*.py")) + sorted((ROOT / "adainfer_kernels").rglob("*.py"))
    offenders = [str(f.relative_to(ROOT)) for f in files if "vllm" in _imported_modules(f) and f.parent.name != "vllm"]
    assert not offenders, f"only python/adainfer/vllm may import vllm: {offenders}"
    code = "import sys, adainfer.vllm; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing adainfer.vllm imported vLLM: {out.stdout}"


def test_wings_of_adainfer_import_only_what_the_layering_allows():
    root = ROOT / "python" / "adainfer"
    offenders = {}
    # every wing the rules name exists and every wing on disk has rules: a renamed wing cannot
    # silently drop out of the check
    on_disk = {d.name for d in root.iterdir() if d.is_dir() and (d / "__init__.py").exists()}
    assert on_disk == set(WING_RULES), f"wings on disk {sorted(on_disk)} vs rules {sorted(WING_RULES)}"
    for wing, allowed in WING_RULES.items():
        for f in sorted((root / wing).rglob("*.py")):
            used = {m.split(".")[1] for m in _package_imports(f, "adainfer.") if m.count(".") >= 1}
            used &= set(WING_RULES)
            if used - allowed:
                offenders[str(f.relative_to(ROOT))] = sorted(used - allowed)
    assert not offenders, f"wings import across the layering: {offenders}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports), of any length: its strongly
    connected components with more than one module, plus modules that import themselves (Tarjan's
    algorithm, iterative). Each cycle sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return sorted(found)


def test_import_cycle_finder_finds_cycles_of_any_length():
    """The finder itself, on small synthetic graphs: a 3-cycle (which no pairwise check sees), a 2-cycle,
    a self-import, nothing in a DAG with shared descendants."""
    three = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(three) == [["a", "b", "c"]]
    assert import_cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
    assert import_cycles({"s": {"s", "t"}, "t": set()}) == [["s"]]
    mixed = {**three, "p": {"q"}, "q": {"r"}, "r": {"s", "p"}, "s": {"s"}, "f": {"e", "a"}}
    assert import_cycles(mixed) == [["a", "b", "c"], ["p", "q", "r"], ["s"]]
    assert import_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set(), "u": {"missing"}}) == []


def test_no_import_cycles_between_kernel_modules():
    files = {f"adainfer_kernels.{f.stem}": f for f in (ROOT / "adainfer_kernels").glob("*.py") if f.stem != "__init__"}
    graph = {m: {i for i in _package_imports(f, "adainfer_kernels.") if i in files} for m, f in files.items()}
    assert sum(map(len, graph.values())) > 0, "no imports between kernel modules found: the scan is broken"
    cycles = import_cycles(graph)
    assert not cycles, f"kernel modules import each other in cycles: {cycles}"


def test_the_runtime_and_the_vllm_plugin_load_no_fitting_library():
    """scikit-learn and threadpoolctl fit classifiers; serving one (the HF runtime, a classifier and its
    probe file, the vLLM plugin's venv, which has neither) must not import them."""
    code = (
        "import sys, adainfer, adainfer.vllm, adainfer.calibration.probe, adainfer.calibration.classifier;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'threadpoolctl')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing the runtime imported a fitting library: {out.stdout}"
