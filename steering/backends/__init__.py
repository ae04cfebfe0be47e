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

NAMES = ("hf", "transformer_lens", "nnsight")
ENGINES = ("vllm",)  # backends that run their own engine (no transformers module in this process)

__all__ = ["ENGINES", "NAMES"]
