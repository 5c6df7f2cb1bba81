# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   creates .venv/, installs the pinned dependencies, runs the main job on the bundled sample data
#   make test   the same set-up, then the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test test-all lint bench gpu-check gpu-wheels clean-runs

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

# The GPU check (bench/README.md): <= 8 min on one GPU, writes bench/results/<date>-<gpu>.json and .md; without
# a GPU one line and exit 0. No `setup`: a GPU machine without the venv runs it with its own Python
# (make gpu-check PYTHON=python3 GPU_CHECK_ARGS="--only maskrcnn").
GPU_CHECK_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	@$(GPU_CHECK_PYTHON) -m platform.bench gpu $(GPU_CHECK_ARGS)

# The wheels and data the check needs on a bare GPU machine, into .whl/ and .gpu-data/ (git-ignored)
gpu-wheels:
	bash bench/gpu-device.sh prepare

clean-runs:
	rm -rf .mlflow .ray_results
