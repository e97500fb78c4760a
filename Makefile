# The Quickstart's two commands (README): `make demo` and `make test`. Each creates .venv on first use and installs
# CPU torch first (plain `pip install torch` would pull a multi-GB CUDA build), then the project, both held to the
# versions the tests and the README's figures come from (constraints.txt). .ci/run calls `make test` too. On a GPU
# machine install the torch build you want into .venv first; make keeps it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c $(CONSTRAINTS)

.PHONY: demo test clean-venv

demo: $(VENV)/.installed
	$(BIN)/python -m abliterate demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

clean-venv:
	rm -rf $(VENV)
