# The two quick-start commands: `make run` (set up, run the default workflow) and `make test`.
PYTHON ?= python3
VENV := .venv
# torch is pinned to the CPU build on disk; an unpinned torch would pull a multi-GB CUDA build.
PIP := $(VENV)/bin/pip install --quiet --constraint .ci/constraints.txt
WORKFLOW ?= workflows/arithmetic.json

.PHONY: run test setup setup-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

setup: $(VENV)/bin/python
	$(PIP) --editable .

setup-test: $(VENV)/bin/python
	$(PIP) --editable '.[test]'

run: setup
	$(VENV)/bin/nodegraph run $(WORKFLOW)

test: setup-test
	$(VENV)/bin/python -m pytest
