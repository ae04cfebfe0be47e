"""vLLM engine arguments (a spec's ``[engine_kwargs]``): which change a run's numbers, which only how it runs.

A key that changes what the engine computes (``quantization``, ``kv_cache_dtype``, ``seed``, ``revision``, ...) is
part of a run's identity, so a resume with another value is refused; a key that only changes how the engine runs
(memory, batching, caching) is operational, so a run may resume with another value. Keys that another spec key
already sets (``model``, ``dtype``, ``tensor_parallel_size``, ...) or that would run code from the model folder
(``trust_remote_code``: the spec's own named flag) are refused, and so is any key in neither list: an unknown key
could change the numbers unrecorded. Extend the lists (with the reason) to allow another vLLM argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPERATIONAL_ENGINE_KEYS = frozenset(
    {
        "max_model_len",  # a longer prompt is refused, never truncated: same numbers when it fits
        "gpu_memory_utilization",
        "enable_prefix_caching",  # the steering block keys keep cached prefixes exact
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "cpu_offload_gb",
        "kv_cache_memory_bytes",
        "num_gpu_blocks_override",
        "limit_mm_per_prompt",
        "language_model_only",
        "skip_mm_profiling",
        "mm_processor_cache_gb",
        "disable_log_stats",
        "distributed_executor_backend",
        "pipeline_parallel_size",
        "data_parallel_size",
        "disable_custom_all_reduce",
        "download_dir",
        "max_parallel_loading_workers",
        "use_tqdm_on_load",
        "max_logprobs",
        "served_model_name",
    }
)
"""Engine arguments that change how the engine runs, not what it computes."""

NUMERIC_ENGINE_KEYS = frozenset(
    {
        "quantization",
        "quantization_config",
        "kv_cache_dtype",
        "calculate_kv_scales",
        "seed",
        "revision",
        "code_revision",
        "tokenizer_revision",
        "tokenizer_mode",
        "hf_overrides",
        "load_format",
        "model_impl",
        "attention_backend",
        "disable_sliding_window",
        "generation_config",
        "override_generation_config",
        "mamba_cache_dtype",
        "mamba_ssm_cache_dtype",
        "logprobs_mode",
    }
)
"""Engine arguments that change what the engine computes: recorded in a run's identity."""

RESERVED_ENGINE_KEYS: dict[str, str] = {
    "model": "the spec key 'model'",
    "tokenizer": "the spec key 'model' (the tokenizer comes with the model)",
    "dtype": "the spec key 'dtype'",
    "tensor_parallel_size": "the spec key 'tensor_parallel_size'",
    "trust_remote_code": "the spec key 'trust_remote_code = true' (load_model(..., trust_remote_code=True))",
    "enforce_eager": "nothing: the steering hooks always run eagerly",
    "worker_extension_cls": "nothing: the steering worker extension is always installed",
    "worker_cls": "nothing: the steering worker extension is always installed",
}
"""Engine arguments set elsewhere, and where."""


def check_engine_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the first engine argument that is reserved (set by another key) or unknown."""
    for key in kwargs:
        if key in RESERVED_ENGINE_KEYS:
            raise ValueError(f"engine argument {key!r} cannot be set here; use {RESERVED_ENGINE_KEYS[key]}")
        if key not in OPERATIONAL_ENGINE_KEYS and key not in NUMERIC_ENGINE_KEYS:
            raise ValueError(
                f"unknown engine argument {key!r}: it might change the results without being recorded, so it is "
                f"refused; known arguments that change results (recorded in the run's identity): "
                f"{', '.join(sorted(NUMERIC_ENGINE_KEYS))}; that do not: {', '.join(sorted(OPERATIONAL_ENGINE_KEYS))}"
            )


def numeric_engine_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The engine arguments that change what the engine computes (part of a run's identity)."""
    return {key: value for key, value in kwargs.items() if key in NUMERIC_ENGINE_KEYS}
