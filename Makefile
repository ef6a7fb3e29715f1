# The two quick-start commands: `make run` (set up, run the default workflow) and `make test`.
PYTHON ?= python3
NPM ?= npm
VENV := .venv
# torch is pinned to the CPU build on disk; an unpinned torch would pull a multi-GB CUDA build.
PIP := $(VENV)/bin/pip install --quiet --constraint .ci/constraints.txt
WORKFLOW ?= workflows/txt2img.json
# The browser editor that `nodegraph serve` serves: built from web/ with the versions in its lockfile.
# Every file the build reads (sources at any depth under web/src, and web/public, copied as it is), so
# that any change rebuilds it.
EDITOR_SOURCES := web/index.html web/package.json web/vite.config.ts web/tsconfig.json \
	$(shell find web/src web/public -type f 2>/dev/null)

.PHONY: run serve test setup setup-run setup-test editor test-web wheel

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

web/node_modules/.package-lock.json: web/package-lock.json
	cd web && $(NPM) ci --no-audit --no-fund

web/dist/index.html: web/node_modules/.package-lock.json $(EDITOR_SOURCES)
	cd web && $(NPM) run build

editor: web/dist/index.html

# The command-line job needs no editor build (and so no npm).
setup-run: $(VENV)/bin/python
	$(PIP) --editable .

setup: setup-run editor

# With the Ray extra, so the Ray backend's tests run rather than skip.
setup-test: $(VENV)/bin/python editor
	$(PIP) --editable '.[test,ray]'

run: setup-run
	$(VENV)/bin/nodegraph run $(WORKFLOW)

serve: setup
	$(VENV)/bin/nodegraph serve

# A wheel (and source distribution) in dist/ that carries the editor built here: `pip install` of it
# serves the editor with no npm (setup.py copies web/dist into the nodegraph.server package).
wheel: setup-test
	$(VENV)/bin/python -m build --no-isolation --outdir dist .

test-web: web/node_modules/.package-lock.json
	cd web && $(NPM) test

# The Python suite includes the editor's end-to-end test (tests/web), which needs Chromium.
test: setup-test test-web
	$(VENV)/bin/python -m pytest
