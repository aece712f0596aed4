# Two commands do all set-up from a fresh clone:
#   make demo   - the main job on the default model (SmolLM2-135M-Instruct)
#   make test   - the test suite
# Both create .venv on first use (the demo installs the package, the tests add their tools). On a machine without an NVIDIA driver the set-up pins
# torch==2.13.0 (on this project's machines a CPU wheel from local disk); elsewhere add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to take it from PyTorch's CPU-only index,
# or pip may pull PyPI's wheel with multi-GB CUDA packages. With a GPU, pip installs the
# package's own range (torch>=2.5) into .venv; to use a torch you already have, create the
# environment first with `python3 -m venv --system-site-packages .venv`.
TORCH_INDEX ?=

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The package and its dependencies (what the demo needs); then the test and dev tools (pytest,
# hypothesis, the transformers oracle, CuPy and NVRTC for the compile checks, ruff, matplotlib).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup demo test lint clean

setup: $(TEST_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then :; else $(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(TEST_STAMP)
	$(BIN)/ruff check awq_ref awq_kernels tools tests docs/checks
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check awq_ref awq_kernels tools tests docs/checks

clean:
	rm -rf $(VENV) .pytest_cache
