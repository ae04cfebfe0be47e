"""Models: the front door to the backends (``steering.backends``, one package per backend). ``load_model`` /
``wrap`` give a ``SteeringModel`` on any in-process backend (plain transformers, TransformerLens, nnsight), or a
``VLLMModel`` on a vLLM engine; ``Encoded`` is a tokenized batch with its row layout."""

from steering.backends.base import NORM_TEXTS, Encoded, Prompt, TextModel
from steering.backends.errors import Unsupported
from steering.backends.hf import SteeringModel
from steering.backends.nnsight import NNsightModel, TracedModel
from steering.backends.protocol import Backend, ScoringSession
from steering.backends.transformer_lens import TransformerLensModel
from steering.backends.vllm import VLLMModel
from steering.models.loading import load_model
from steering.models.wrap import BACKENDS, hf_module, wrap, wrap_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "NORM_TEXTS",
    "Encoded",
    "NNsightModel",
    "Prompt",
    "ScoringSession",
    "SteeringModel",
    "TextModel",
    "TracedModel",
    "TransformerLensModel",
    "Unsupported",
    "VLLMModel",
    "hf_module",
    "load_model",
    "wrap",
    "wrap_backend",
]
