"""Hook adapters for the other libraries that can run a model: TransformerLens hook points and nnsight traces.

A *backend* is the library that runs the model (``hf`` = plain transformers, the reference; ``transformer_lens``;
``nnsight``). Each adapter here drives the one engine, ``steering.hooks.Plan``: it feeds every forward call's row
positions to the plan and lets ``plan.edit`` rewrite the decoder-block outputs, so positions, coefficients and
operations mean the same on every backend. The adapters import their library only when called.

``vllm`` is the engine side of the vLLM backend (``steering.models.vllm.VLLMModel``): a worker extension that
drives one ``Plan`` per step of vLLM's flattened batches, every request with its own interventions. It is not in
``NAMES``: a vLLM model is loaded as its own engine (``load_model(..., backend="vllm")``), never converted from a
transformers module.
"""

from __future__ import annotations

NAMES = ("hf", "transformer_lens", "nnsight")

__all__ = ["NAMES"]
