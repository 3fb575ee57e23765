#!/usr/bin/env bash
# The one prepared script for a lent GPU (H200): build the package against the machine's own CUDA
# torch, run the GPU correctness tests (exit head at real shapes, compaction CUDA kernels), then the
# exit-head benchmark (ms, GB/s of W, % of the HBM roofline, ratios vs the unfused torch path and the
# bare GEMM), the compaction benchmark and the generation benchmark (decode/prefill vs a cost model). Everything lands under $OUT, in at most 8 files (what the
# device tool brings back). Budget: < 8 minutes in all (each step has its own timeout).
#
#   OUT=/path/to/results bash bench/gpu_check.sh
#
# The machine has no network: nothing is downloaded (pip --no-index --no-deps). Its image brings
# Python 3.12, torch 2.11 (CUDA), triton 3.6, pytest, pytest-benchmark. Never run on CPU CI.
set -uo pipefail

: "${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
HBM_GBS="${HBM_GBS:-4300}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
START=$(date +%s)
STATUS=0

log() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# Seconds left of the 8-minute budget, minus a margin, capped at $1.
budget() {
    local left=$((460 - ($(date +%s) - START)))
    if ((left > $1)); then left=$1; fi
    if ((left < 10)); then left=10; fi
    echo "$left"
}

log "machine"
nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi failed"
"$PY" - >>"$LOG" 2>&1 <<'PYEOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
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
"$PY" -c "import json, adainfer_kernels; print(json.dumps(adainfer_kernels.info(), indent=1, default=str))" \
    >"$OUT/info.json" 2>&1 || { log "adainfer_kernels does not import (see info.json)"; STATUS=1; }

# 2) GPU correctness: the compiled kernels (no interpreter) against the reference at real shapes.
export TRITON_INTERPRET=0
log "tests: tests/kernels/test_exit_head_gpu.py, tests/csrc/test_compaction.py -k cuda, CPU + CUDA split models"
if ! timeout "$(budget 200)" "$PY" -m pytest tests/kernels/test_exit_head_gpu.py tests/csrc/test_compaction.py \
    tests/adainfer/test_placement.py -k "gpu or cuda or Gpu or Cuda" -q -rs -p no:cacheprovider \
    >"$OUT/gpu_tests.log" 2>&1; then
    log "GPU tests FAILED or timed out (see gpu_tests.log)"
    STATUS=1
fi
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$LOG"

# 3) The benchmark: every shape of issue 3, CSV rows appended under $OUT.
export ADAINFER_BENCH_DIR="$OUT"
log "bench: bench/bench_exit_head.py --device cuda"
if ! timeout "$(budget 150)" "$PY" bench/bench_exit_head.py --device cuda --hbm-gbs "$HBM_GBS" \
    >"$OUT/bench_exit_head.txt" 2>&1; then
    log "benchmark FAILED or timed out (see bench_exit_head.txt)"
    STATUS=1
fi
cat "$OUT/bench_exit_head.txt" >>"$LOG"
log "bench: bench/bench_compaction.py --device cuda"
if ! timeout "$(budget 90)" "$PY" bench/bench_compaction.py --device cuda >"$OUT/bench_compaction.txt" 2>&1; then
    log "compaction benchmark FAILED or timed out (see bench_compaction.txt)"
    STATUS=1
fi

# 4) Generation: prefill and decode with forced exits and a cost-model ideal (bench_generate.py),
#    a reduced GPU grid that fits the budget; rows are appended per configuration.
log "bench: bench/bench_generate.py --device cuda"
if ! timeout "$(budget 200)" "$PY" bench/bench_generate.py --device cuda --batches 1 8 32 128 \
    --prompt-lens 256 1024 --new-tokens 64 --reps 2 --label gpu >"$OUT/bench_generate.txt" 2>&1; then
    log "generation benchmark FAILED or timed out (see bench_generate.txt)"
    STATUS=1
fi

log "done, status $STATUS"
exit "$STATUS"
