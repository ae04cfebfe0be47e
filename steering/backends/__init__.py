"""The backends: one package per library that runs a model, each holding its driver (the model class) and its
hook adapter (how it drives the hooks engine, ``steering.hooks.Plan``), so positions, coefficients and operations
mean the same on every backend.

* ``hf``: plain transformers in this process, the reference (``SteeringModel``);
* ``transformer_lens``: a TransformerLens ``TransformerBridge`` (``TransformerLensModel``);
* ``nnsight``: nnsight traces, local or remote (``NNsightModel``);
* ``vllm``: a vLLM engine whose workers run the hooks (``VLLMModel``): continuous batching, tensor parallelism.

``base.py`` holds what every backend's model shares (``TextModel``, ``Encoded``). The first three wrap the same
Hugging Face module and convert into each other (``NAMES``, ``steering.models.wrap``); a vLLM model is its own engine
(``ENGINES``), loaded with ``load_model(..., backend="vllm")``, never converted from a transformers module.
Each backend imports its library only when it needs it.
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "hf": "steering.backends.hf:SteeringModel",
    "transformer_lens": "steering.backends.transformer_lens:TransformerLensModel",
    "nnsight": "steering.backends.nnsight:NNsightModel",
    "vllm": "steering.backends.vllm:VLLMModel",
}
"""Every backend: its name -> its model class (``package:Class``), which meets ``protocol.Backend``."""
NAMES = ("hf", "transformer_lens", "nnsight")  # run a transformers module in this process; convert into each other
ENGINES = ("vllm",)  # run their own engine (no transformers module in this process): loaded, never converted


def model_class(name: str) -> type:
    """The model class of backend ``name`` (imported now; its library is not): ask it a capability before a model
    is loaded, e.g. ``model_class(spec.backend).can_prefill()``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "NAMES", "REGISTRY", "model_class"]
