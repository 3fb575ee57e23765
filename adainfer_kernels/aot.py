"""Ahead-of-time compilation of the package's Triton kernels for real GPUs, without a GPU.

This is the CI gate that proves a kernel is GPU-ready on a machine that has none: Triton compiles
the kernel to PTX for a target architecture (sm_80 = A100, sm_90a = H100/H200) and the ``ptxas``
shipped in Triton's wheel assembles it with ``-v``, which reports registers, stack and spill bytes.
A kernel that spills registers to local memory is slow on the GPU; the gate requires zero spills.

Compilation runs in a subprocess with ``TRITON_INTERPRET`` unset: under the interpreter
``@triton.jit`` yields interpreted functions that Triton's compiler cannot take, and tests set the
interpreter before kernels are imported.

    reports = compile_kernels([KernelSpec("adainfer_kernels.x", "_x_kernel", {...}, {...})])
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field

ARCHS = ("sm_80", "sm_90a")
_CAPABILITY = {"sm_80": 80, "sm_90a": 90}

_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REG_RE = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of a ``@triton.jit`` kernel to compile.

    Args:
        module: importable module holding the kernel, e.g. ``"adainfer_kernels.exit_head"``.
        kernel: attribute name of the ``@triton.jit`` function in that module.
        signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: values of the ``constexpr`` arguments.
        num_warps, num_stages: launch options the kernel is used with.
        label: a readable name for reports (defaults to ``module.kernel``).
        divisible_by_16: arguments (pointers or ints) known to be multiples of 16, as Triton's JIT
            specialisation marks them at launch when they are (aligned pointers, strides and
            sizes of real shapes): compiling without them gives the unaligned, unvectorised code.
    """

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, int | bool] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible_by_16: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.label or f"{self.module}.{self.kernel}"


@dataclass(frozen=True)
class AotReport:
    """What ``ptxas -v`` says of one kernel specialisation on one architecture."""

    name: str
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ptxas_log: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def summary(self) -> str:
        return (
            f"{self.name} [{self.arch}]: {self.registers} regs, {self.shared_bytes} B shared, "
            f"{self.stack_bytes} B stack, spills {self.spill_stores} st / {self.spill_loads} ld"
        )


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack and spill bytes from ``ptxas -v`` output (summed over entry functions)."""
    regs = [int(m.group(1)) for m in _REG_RE.finditer(log)]
    frames = [tuple(int(g) for g in m.groups()) for m in _SPILL_RE.finditer(log)]
    if not regs or not frames:
        raise ValueError(f"could not parse ptxas -v output:\n{log}")
    return {
        "registers": max(regs),
        "stack_bytes": sum(f[0] for f in frames),
        "spill_stores": sum(f[1] for f in frames),
        "spill_loads": sum(f[2] for f in frames),
    }


def ptxas_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found in the triton wheel at {path}")
    return path


def _compile_in_process(spec: KernelSpec, arch: str, workdir: str) -> AotReport:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", _CAPABILITY[arch], 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx_file = os.path.join(workdir, f"{spec.kernel}_{arch}.ptx")
    with open(ptx_file, "w") as f:
        f.write(compiled.asm["ptx"])
    proc = subprocess.run(
        [ptxas_path(), "-v", "--gpu-name", arch, ptx_file, "-o", ptx_file + ".cubin"],
        capture_output=True,
        text=True,
        check=False,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.name} on {arch}:\n{log}")
    stats = parse_ptxas_log(log)
    return AotReport(name=spec.name, arch=arch, shared_bytes=int(compiled.metadata.shared), ptxas_log=log, **stats)


def compile_kernels(
    specs: list[KernelSpec],
    archs: tuple[str, ...] = ARCHS,
    timeout: float = 900,
    extra_sys_path: tuple[str, ...] = (),
) -> list[AotReport]:
    """Compile every spec for every arch in one subprocess (no interpreter) and return the reports.

    ``extra_sys_path`` lists folders to import kernel modules from (e.g. a test's own folder).
    """
    for arch in archs:
        if arch not in _CAPABILITY:
            raise ValueError(f"unknown arch {arch!r} (supported: {', '.join(_CAPABILITY)})")
    payload = json.dumps({"specs": [asdict(s) for s in specs], "archs": list(archs)})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_sys_path:
        env["PYTHONPATH"] = os.pathsep.join([*extra_sys_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "adainfer_kernels.aot"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-6000:]}")
    return [AotReport(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _main() -> None:
    import tempfile

    request = json.loads(sys.stdin.read())
    reports = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec_dict in request["specs"]:
            spec_dict["divisible_by_16"] = tuple(spec_dict.get("divisible_by_16", ()))
            spec = KernelSpec(**spec_dict)
            for arch in request["archs"]:
                reports.append(asdict(_compile_in_process(spec, arch, workdir)))
    print(json.dumps(reports))


if __name__ == "__main__":
    _main()
