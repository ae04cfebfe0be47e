"""vLLM backend, the scheduler patch: prefix-cache blocks hashed with each request's steering.

``install_block_keys`` appends a per-block steering digest (``wire.steering_block_key``) to vLLM's block hashes: a
block's KV depends on the tokens and on the steering at positions ``[0, block end)``, so blocks are shared exactly
when both agree, and blocks before a request's first steered position keep their plain hash (the system prompt
stays shared with every cell). It must run in the process that owns the scheduler: the driver for the in-process
engine (``load_vllm``), else the ``vllm.general_plugins`` entry point (``plugin.register_plugin``) in the EngineCore
process. vLLM's private names are reached through ``compat`` only.
"""

from __future__ import annotations

from typing import Any

from steering.backends.vllm import compat
from steering.backends.vllm.wire import EXTRA_KEY, steering_block_key


def install_block_keys() -> bool:
    """Patch vLLM's per-block hash extra keys (``generate_block_hash_extra_keys``, in every module that imports it
    by name: ``compat.BLOCK_HASH_MODULES``) to append ``("steering", steering_block_key(...))``. Idempotent;
    returns True if it patched now. Must run in the scheduler's process before requests arrive (see the module
    docstring)."""
    if block_keys_installed():
        return False
    original = compat.block_hash_function()

    def generate_block_hash_extra_keys(request: Any, start: int, end: int, *args: Any, **kwargs: Any):
        keys, rest = original(request, start, end, *args, **kwargs)
        extra = (compat.request_extra_args(request) or {}).get(EXTRA_KEY)
        key = steering_block_key(extra, end) if extra else None
        if key is not None:
            keys = (*(keys or ()), ("steering", key))
        return keys, rest

    generate_block_hash_extra_keys._steering = True  # type: ignore[attr-defined]
    generate_block_hash_extra_keys._steering_original = original  # type: ignore[attr-defined]
    for module in compat.block_hash_modules():
        setattr(module, compat.BLOCK_HASH_FUNCTION, generate_block_hash_extra_keys)
    return True


def block_keys_installed() -> bool:
    """True if this process's vLLM hashes blocks with steering keys (in every module that holds the function)."""
    return all(getattr(getattr(m, compat.BLOCK_HASH_FUNCTION), "_steering", False) for m in compat.block_hash_modules())
