"""Models: ``load_model`` / ``wrap`` give a ``SteeringModel`` on any backend (plain transformers, TransformerLens,
nnsight), or a ``VLLMModel`` on a vLLM engine; ``Encoded`` is a tokenized batch with its row layout."""

from steering.models.base import NORM_TEXTS, Encoded, Prompt, SteeringModel, TextModel
from steering.models.loading import load_model
from steering.models.nnsight import NNsightModel, TracedModel
from steering.models.transformer_lens import TransformerLensModel
from steering.models.vllm import VLLMModel
from steering.models.wrap import BACKENDS, hf_module, wrap, wrap_backend

__all__ = [
    "BACKENDS",
    "NORM_TEXTS",
    "Encoded",
    "NNsightModel",
    "Prompt",
    "SteeringModel",
    "TextModel",
    "TracedModel",
    "TransformerLensModel",
    "VLLMModel",
    "hf_module",
    "load_model",
    "wrap",
    "wrap_backend",
]
