# Two commands do all the set-up (both idempotent):
#   make demo   - create .venv if missing, install, run zsharp-compare on the embedded digits data
#   make test   - create/update the same .venv with the dev extras and run the whole test suite
# and:
#   make test-latest - the core on the newest torch available here (.venv-latest, no Composer/timm)
#   make wheel       - build the wheel into dist/ (install it with pip install dist/zsharp_algos-*.whl)
#   make bench       - the benchmark set (benchmarks/), JSON + table + PNG chart
#   make docs        - the documentation site into docs/_build/html (warnings are errors; make test builds it too)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
# The newest torch pip installs here (`pip index versions torch`; this machine's pip caps it at 2.14.1).
TORCH_LATEST ?= 2.14.1
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-latest wheel bench docs clean

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

# The wheel is built in pip's isolated build environment (setuptools >= 77 from the index), so
# it does not depend on what .venv holds; old wheels of this package are removed first.
wheel: | $(BIN)/python
	rm -f dist/zsharp_algos-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .

bench: $(VENV)/.all-installed
	$(BIN)/python benchmarks/run_all.py

# Sources: README.md, docs/ and integrations/*/README.md (docs/conf.py); the API pages come from
# the docstrings. tests/test_docs.py builds the site with the same flags.
docs: $(VENV)/.all-installed
	$(BIN)/python -m sphinx -W --keep-going -n -q -b html -c docs . docs/_build/html
	@echo "open docs/_build/html/docs/index.html"

clean:
	rm -rf $(VENV) $(LATEST) results dist build docs/_build
