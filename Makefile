# normlab: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench lint format clean chromium

# torch first, pinned: 2.13.0 is a CPU build on local disk; an unpinned torch would pull
# gigabytes of CUDA. Everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/normlab demo

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every unit test, in under 2 minutes on 2 cores: leaves out the tests marked slow (long
# experiment runs, full demos, fresh interpreters), distributed (gloo process groups) and
# browser (Chromium); `make test` runs them all and stays the CI command.
test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not distributed and not browser" $(PYTEST_ARGS)

bench: venv
	$(BIN)/normlab bench --out benchmarks/results

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: venv
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

# Headless Chromium for the browser-marked tests (the demo report's render check); needs root.
chromium:
	apt-get update && apt-get install -y chromium

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
