# Two entry points for a fresh machine (Python 3.11 + a C++ compiler):
#   make demo   installs everything into .venv and runs the main job
#   make test   installs everything into .venv, lints (make lint) and runs the test suite
# torch is pinned to the build this project is developed and measured with.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo lint test bench clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q ninja "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[clip,test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kalman-clip demo

# ruff's settings are in pyproject.toml ([tool.ruff]); a finding fails the target.
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q
	$(PY) -m benchmarks.report

clean:
	rm -rf build $(VENV) *.egg-info kalman_kernels/*.so kalman_kernels/_build_info.py

# The prepared GPU check (docs/cuda_backend.md, "Running the GPU check"), for a machine with
# one NVIDIA GPU: it installs into that machine's own Python (PYTHON, default python3) with
# no downloads, so it deliberately does not depend on the .venv of the targets above.
.PHONY: gpu-check
gpu-check:
	PYTHON="$(PYTHON)" bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)
