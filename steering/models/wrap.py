"""Pick a backend at load, or wrap a model you already have: ``wrap(obj)`` and ``wrap_backend(model, backend)``.

A *backend* is the library that runs the model: ``hf`` (plain transformers, the reference), ``transformer_lens``
or ``nnsight``. Every backend gives a ``SteeringModel`` with the same positions, coefficients and operations.
"""

from __future__ import annotations

from torch import nn

from steering.backends import NAMES, model_class
from steering.backends.base import TextModel
from steering.backends.hf import SteeringModel
from steering.backends.nnsight import NNsightModel, TracedModel
from steering.backends.nnsight import hooks as nns
from steering.backends.transformer_lens import TransformerLensModel
from steering.backends.transformer_lens import hooks as tl

BACKENDS = NAMES


def hf_module(model: SteeringModel) -> nn.Module:
    """The Hugging Face model under any backend's ``SteeringModel``."""
    return model.hf_module()


def wrap_backend(model: SteeringModel, backend: str, eager_attention: bool = False) -> SteeringModel:
    """``model`` re-wrapped to run through ``backend`` (one of ``BACKENDS``); the Hugging Face model is shared.

    Wrapping in TransformerLens replaces the model's blocks with bridge components in place (numbers unchanged).
    ``eager_attention=True`` keeps TransformerLens's eager attention (for attention-pattern hooks).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if model.backend == backend:
        return model
    return model_class(backend).convert(model, eager_attention)


def wrap(
    obj: object,
    tokenizer=None,
    backend: str | None = None,
    name: str | None = None,
    layers_path: str | None = None,
    remote: bool = False,
) -> SteeringModel:
    """A ``SteeringModel`` for ``obj``: a ``TransformerBridge``, an nnsight model, a ``SteeringModel`` or a Hugging
    Face causal LM (which needs ``tokenizer``). ``backend`` converts it; by default it keeps the object's own.
    ``remote=True`` (nnsight models only) runs every trace on NDIF instead of loading the weights here."""
    if isinstance(obj, TextModel) and not isinstance(obj, SteeringModel):  # an engine (vLLM): nothing to convert
        if backend not in (None, obj.backend):
            raise ValueError(
                f"a {obj.backend} model runs in its own engine and cannot be converted to {backend!r}; load the model "
                f"again with load_model(..., backend={backend!r})"
            )
        return obj
    if isinstance(obj, SteeringModel):
        wrapped = obj
    elif tl.is_bridge(obj):
        wrapped = TransformerLensModel(obj, tokenizer, name, layers_path)
    elif nns.is_nnsight(obj):
        if not hasattr(obj, "_module") or not isinstance(nns.hf_model(obj), nn.Module):
            raise ValueError("this nnsight model has no local torch module; load it locally (dispatch=True)")
        wrapped = NNsightModel(obj, tokenizer, name, layers_path, remote=remote)
    elif isinstance(obj, nn.Module) and hasattr(obj, "config"):
        if tokenizer is None:
            raise ValueError("wrapping a Hugging Face model needs its tokenizer: wrap(model, tokenizer=tok)")
        wrapped = SteeringModel(obj, tokenizer, name, layers_path)
    else:
        raise ValueError(
            f"cannot wrap a {type(obj).__name__}; pass a TransformerBridge, an nnsight LanguageModel / "
            "TransformersModel, a SteeringModel, or a Hugging Face causal LM with its tokenizer"
        )
    if remote and not isinstance(wrapped, NNsightModel):
        raise ValueError("remote=True needs an nnsight model: wrap(LanguageModel(repo_id), remote=True)")
    if wrapped.tokenizer is None:
        raise ValueError("no tokenizer found on the model; pass wrap(obj, tokenizer=tok)")
    return wrapped if backend is None else wrap_backend(wrapped, backend)


__all__ = ["BACKENDS", "NNsightModel", "TracedModel", "TransformerLensModel", "hf_module", "wrap", "wrap_backend"]
