# Two commands do all the set-up (both idempotent):
#   make demo   - create .venv if missing, install, run zsharp-compare on the embedded digits data
#   make test   - create/update the same .venv with the dev extras and run the whole test suite
# and:
#   make test-latest - the core on the newest torch available here (.venv-latest, no Composer/timm)
#   make bench       - the benchmark set (benchmarks/), JSON + table + PNG chart

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
TORCH_LATEST ?= 2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-latest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps record what was installed; they are redone when the package metadata or pins change.
$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[vision,demo]"
	touch $@

$(VENV)/.all-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/zsharp-compare $(DEMO_ARGS)

test: $(VENV)/.all-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(LATEST)/bin/python:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip

$(LATEST)/.installed: pyproject.toml constraints-latest.txt | $(LATEST)/bin/python
	$(LATEST)/bin/python -m pip install --quiet "torch==$(TORCH_LATEST)"
	$(LATEST)/bin/python -m pip install --quiet -c constraints-latest.txt -e ".[hf,demo,dev]"
	touch $@

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.all-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(LATEST) results
