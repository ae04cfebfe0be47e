"""vLLM backend, the plugin: vLLM calls ``register_plugin`` (the ``vllm.general_plugins`` entry point declared in
pyproject.toml) in each of its processes, so an EngineCore running in another process hashes prefix-cache blocks
with each request's steering too (``scheduler.install_block_keys``)."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from steering.backends.vllm import compat
from steering.backends.vllm.scheduler import install_block_keys

PLUGIN_NAME = "steering"  # the vllm.general_plugins entry point (pyproject.toml)


def plugin_declared() -> bool:
    """True if an installed distribution declares our ``vllm.general_plugins`` entry point and ``VLLM_PLUGINS``
    (vLLM's allow-list, when set) does not leave it out: then every EngineCore process installs the block keys."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        return False
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=compat.PLUGIN_GROUP))


def register_plugin() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes, also for engines that do
    not steer (the keys change only for requests that carry steering). On a vLLM the backend does not support it
    patches nothing and warns: the driver refuses such a vLLM by name before any steering request exists."""
    try:
        compat.require()
    except (compat.VLLMVersionError, compat.VLLMCompatError) as exc:
        compat.log.warning("steering vLLM plugin: prefix-cache block keys not installed: %s", exc)
        return
    install_block_keys()
