# fundus-edge: two commands, `make demo` and `make test`. Each creates .venv on first use.
# pip resolves torch/torchvision through this machine's pip config (local store, version cap).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fundus-edge-installed
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: demo test lint format venv clean-demo help

help:
	@echo "make demo   - run the whole job end to end on generated data (creates .venv)"
	@echo "make test   - ruff lint + format check and the whole pytest suite (creates .venv)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[train,dev]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The demo: each step is a real command a user would type.
demo: $(STAMP)
	$(BIN)/fundus-edge doctor --no-camera-probe
