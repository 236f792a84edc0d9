# Two commands on a fresh machine:  make quickstart   |   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: a CPU wheel that is on disk here. The package itself only asks for torch>=2.5.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

quickstart: setup
	$(BIN)/lmforge quickstart

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/model_speed.py
