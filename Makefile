# The Quickstart's two commands (README): `make demo` and `make test`. Each creates .venv on first use and installs
# CPU torch first (plain `pip install torch` would pull a multi-GB CUDA build), then the project. .ci/run calls
# `make test` too. On a GPU machine install the torch build you want into .venv first; make keeps it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

demo: $(VENV)/.installed
	$(BIN)/python -m abliterate demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

clean-venv:
	rm -rf $(VENV)
