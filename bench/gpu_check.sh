#!/usr/bin/env bash
# The one prepared script for a lent GPU (H200): build the package against the machine's own CUDA
# torch, run the GPU tests (`pytest -m gpu tests`: the exit head at real shapes, the compaction CUDA
# kernels, CPU + CUDA split models), then the exit-head benchmark (ms, GB/s of W, % of the HBM
# roofline, ratios vs the unfused torch path and the bare GEMM, at (576, 49152), (4096, 32000) and
# (4096, 128256)), the compaction benchmark and the generation benchmark (decode/prefill vs a cost
# model). Budget: < 8 minutes in all (each step has its own timeout). Everything lands in $OUT, in at
# most 8 files (what the device tool brings back):
#
#   gpu_check.log    the steps, the machine, the versions, adainfer_kernels.info()
#   build.log        the build of adainfer_kernels._C
#   gpu_tests.log    pytest -m gpu tests
#   bench.log        the three benchmarks' printed tables
#   bench_exit_head.csv, bench_compaction.csv, bench_generate.csv   the records (bench/harness.py)
#
#   OUT=/path/to/results bash bench/gpu_check.sh
#
# The machine has no network: nothing is downloaded. Its image brings Python 3.12, torch 2.11 (CUDA),
# triton 3.6, transformers 5.17, pytest, hypothesis, accelerate; what the tests import beyond that
# (lm_eval, imported by tests/app at collection) travels as wheels in .whl/ (carried: `carry: [".whl"]`),
# installed here into /tmp/site. The bundled model (98 MB) cannot travel: without it the generation
# benchmark runs its architecture with random weights (--weights auto; rows say weights=random).
# Never run on CPU CI.
set -uo pipefail

: "${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
HBM_GBS="${HBM_GBS:-4300}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BENCH_LOG="$OUT/bench.log"
START=$(date +%s)
STATUS=0
export PYTHONUNBUFFERED=1

log() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# Seconds left of the 8-minute budget, minus a margin, capped at $1.
budget() {
    local left=$((460 - ($(date +%s) - START)))
    if ((left > $1)); then left=$1; fi
    if ((left < 10)); then left=10; fi
    echo "$left"
}

# 0) Wheels carried in .whl/ (pure-Python packages the image lacks), installed apart from the image's own.
if compgen -G ".whl/*.whl" >/dev/null; then
    log "wheels: $(cd .whl && echo *.whl) -> /tmp/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        log "wheel install FAILED (the tests that import them will not collect)"
        STATUS=1
    fi
fi

log "machine"
nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi failed"
"$PY" - >>"$LOG" 2>&1 <<'PYEOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "setuptools", "pytest", "hypothesis", "accelerate", "lm_eval", "gguf"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PYEOF

# 1) Build _C against this torch (CUDA sources included when torch is a CUDA build).
log "build: pip install --no-build-isolation --no-deps --no-index -e ."
export MAX_JOBS="${MAX_JOBS:-16}"
if ! timeout "$(budget 200)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    >"$OUT/build.log" 2>&1; then
    # An older setuptools in the image can refuse pyproject metadata: build the extension in place.
    log "pip install failed (see build.log); building adainfer_kernels/_C in place instead"
    if ! timeout "$(budget 200)" "$PY" - >>"$OUT/build.log" 2>&1 <<'PYEOF'; then
import glob, os, shutil, torch
from torch.utils.cpp_extension import load
srcs = [l.strip() for l in open("csrc/sources.txt") if l.strip() and not l.lstrip().startswith("#")]
cuda = torch.version.cuda is not None
if not cuda:
    srcs = [s for s in srcs if not s.endswith(".cu")]
build = "build/gpu_check_ext"
os.makedirs(build, exist_ok=True)
flags = ["-O3", "-std=c++17"] + (["-DADAINFER_WITH_CUDA=1"] if cuda else [])
load(name="_C", sources=srcs, extra_include_paths=["csrc"], extra_cflags=flags,
     extra_cuda_cflags=["-O3", "-std=c++17", "-DADAINFER_WITH_CUDA=1"] if cuda else None,
     build_directory=build, verbose=True)
for old in glob.glob("adainfer_kernels/_C*.so"):
    os.remove(old)
shutil.copy(os.path.join(build, "_C.so"), "adainfer_kernels/_C.so")
print("built adainfer_kernels/_C.so in place")
PYEOF
        log "in-place build failed too: the ops fall back to torch (see build.log)"
        STATUS=1
    fi
fi
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
log "adainfer_kernels.info()"
"$PY" -c "import json, adainfer_kernels; print(json.dumps(adainfer_kernels.info(), indent=1, default=str))" \
    >>"$LOG" 2>&1 || { log "adainfer_kernels does not import"; STATUS=1; }

# 2) GPU tests: the compiled kernels (no interpreter) against the reference at real shapes, and every
#    other test marked `gpu`. A module that fails to import is reported without stopping the others.
export TRITON_INTERPRET=0
log "tests: pytest -m gpu tests"
timeout "$(budget 200)" "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider --continue-on-collection-errors \
    >"$OUT/gpu_tests.log" 2>&1
rc=$?
if ((rc == 5)); then
    log "GPU tests: none selected (no test carries the gpu marker?)"
    STATUS=1
elif ((rc != 0)); then
    log "GPU tests FAILED or timed out, rc $rc (see gpu_tests.log)"
    STATUS=1
fi
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$LOG"

# 3) The benchmarks (full runs: their CSV rows go to $OUT, their tables to bench.log).
export ADAINFER_BENCH_DIR="$OUT"
bench() {
    local name=$1 cap=$2
    shift 2
    log "bench: $*"
    echo "==== $* ====" >>"$BENCH_LOG"
    if ! timeout "$(budget "$cap")" "$PY" "$@" >>"$BENCH_LOG" 2>&1; then
        log "$name FAILED or timed out (see bench.log)"
        STATUS=1
    fi
}
# every shape of the default grid: (576, 49152) fp32 + bf16, (4096, 32000) and (4096, 128256) bf16, R 1-256
bench "exit-head benchmark" 150 bench/bench_exit_head.py --device cuda --hbm-gbs "$HBM_GBS"
bench "compaction benchmark" 90 bench/bench_compaction.py --device cuda
# Generation: prefill and decode with forced exits and a cost-model ideal, a reduced GPU grid that fits
# the budget; rows are appended per configuration (a timeout keeps what was measured).
bench "generation benchmark" 200 bench/bench_generate.py --device cuda --weights auto --no-plot \
    --batches 1 8 32 128 --prompt-lens 256 1024 --new-tokens 64 --reps 2 --label gpu

log "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
log "done, status $STATUS"
exit "$STATUS"
