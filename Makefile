# Two commands for a newcomer: `make demo` (the main example) and `make test` (the test suite).
# Both create a local virtualenv in .venv on first use. torch is installed FIRST and pinned, so that the
# package's `torch>=2.4,<3` requirement is already met and pip never pulls a (multi-GB) CUDA build.
# Elsewhere, pick another torch build with e.g. `make test TORCH="torch==2.13.0" TORCH_PIP_ARGS="--index-url ..."`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-gpu lint typecheck docs unit bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PIP) install -e ".[examples,privacy,dev,docs]"
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, '| CUDA build:', torch.version.cuda)"
	touch $(STAMP)

# The demo installs only what it needs (torch, the package, matplotlib, tensorboard), not the test/docs tools.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PIP) install -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python examples/grokking.py

test: $(STAMP) lint typecheck docs unit

lint: $(STAMP)
	$(BIN)/ruff check lightning_optx tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy lightning_optx

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d $(VENV)/site

unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The GPU check (docs/contributing.md): tests/gpu/run_on_device.sh runs the suite in tests/gpu (pytest-xdist, where
# installed, 6 files at a time), then benchmarks/gpu.py, each under its own time limit, and leaves the logs, the
# junit XML and the figures (gpu.json, gpu.png) in GPU_OUT. It uses the python that already holds a CUDA torch
# (GPU_PYTHON), not the CPU-only .venv; it needs no make (the same script is the command on a lent GPU machine).
GPU_PYTHON ?= python3
GPU_OUT ?= benchmarks/results/gpu

test-gpu:
	GPU_PYTHON=$(GPU_PYTHON) bash tests/gpu/run_on_device.sh $(GPU_OUT)

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/grokfast.py --quick

clean:
	rm -rf $(VENV) site runs
