# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   creates .venv/, installs the pinned dependencies, runs the main job on the bundled sample data
#   make test   the same set-up, then the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test test-all lint bench clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	@# Only the dependencies are installed, never this checkout (see pyproject.toml).
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements.txt --group dev
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/python -m platform.tune --space rpn_anchors

test: setup
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python -m tests.lint_imports

bench: setup
	$(BIN)/python -m platform.bench train

clean-runs:
	rm -rf .mlflow .ray_results
