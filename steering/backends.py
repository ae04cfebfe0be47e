"""The same steering API over TransformerLens and nnsight: pick a backend at load, or wrap a model you already have.

``load_model(spec, backend="transformer_lens" | "nnsight")`` or ``wrap(obj)`` (a ``TransformerBridge``, an nnsight
model, a ``SteeringModel`` or a Hugging Face model) give a ``SteeringModel`` whose ``capture``, ``steer`` and
``generate`` run through that backend with the positions, coefficients and operations of plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from steering.hooks import Intervention, RowLayout
from steering.hooks.backends import NAMES, Plan
from steering.hooks.backends import nnsight as nns
from steering.hooks.backends import transformer_lens as tl
from steering.models import NORM_TEXTS, Encoded, Prompt, SteeringModel

BACKENDS = NAMES


class TransformerLensModel(SteeringModel):
    """A ``SteeringModel`` that steers and captures through a TransformerLens ``TransformerBridge``.

    ``.bridge`` is the bridge; ``.model`` is its Hugging Face model, whose blocks are the bridge's components, so a
    forward or ``generate`` of ``.model`` inside ``steer(...)`` fires the bridge's ``hook_resid_post`` hooks.
    """

    backend = "transformer_lens"

    def __init__(self, bridge: nn.Module, tokenizer=None, name: str | None = None, layers_path: str | None = None):
        tokenizer = tokenizer if tokenizer is not None else bridge.tokenizer
        super().__init__(tl.hf_model(bridge), tokenizer, name, layers_path)
        self.bridge = bridge

    def capture(self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at="last"):
        """Residual stream ``{layer: [B, d]}`` from ``blocks.{L}.hook_resid_post`` (see ``steering.hooks.At``)."""
        enc = prompts if isinstance(prompts, Encoded) else self.encode(prompts)
        layers = range(self.n_layers) if layers == "all" else layers
        return tl.capture(self.bridge, enc.input_ids, enc.attention_mask, layers, at, self.layers_path)

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every forward inside is steered through bridge hooks; removed on exit and on errors."""
        with tl.steer(self.bridge, interventions, layout, self.layers_path) as tracker:
            yield tracker


class TracedModel:
    """Stands in for the Hugging Face model of an ``NNsightModel``: calling it or its ``generate`` runs an nnsight
    trace with the steering contexts that are open; any other attribute is the wrapped model's."""

    def __init__(self, lm, layers_path: str, remote: bool = False):
        self.lm = lm
        self.module = nns.hf_model(lm)
        self.layers_path = layers_path
        self.remote = remote
        self.plans: list[Plan] = []

    def __call__(self, *args, **kwargs):
        return nns.forward(self.lm, list(self.plans), args, kwargs, self.layers_path, self.remote)

    forward = __call__

    def generate(self, *args, **kwargs) -> Tensor:
        return nns.generate(self.lm, list(self.plans), args, dict(kwargs), self.layers_path, self.remote)

    def __getattr__(self, name: str):
        if name in ("lm", "module", "plans"):  # not set yet (during unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"TracedModel({type(self.module).__name__}, open_steering_contexts={len(self.plans)})"


class NNsightModel(SteeringModel):
    """A ``SteeringModel`` that steers and captures inside nnsight traces.

    ``.nnsight`` is the nnsight model; ``.model`` is a ``TracedModel``: ``model.model(**enc.inputs)`` and
    ``model.model.generate(...)`` inside ``steer(...)`` run as traces that edit the decoder-block outputs.
    """

    backend = "nnsight"

    def __init__(
        self, lm, tokenizer=None, name: str | None = None, layers_path: str | None = None, remote: bool = False
    ):
        tokenizer = tokenizer if tokenizer is not None else lm.tokenizer
        super().__init__(nns.hf_model(lm), tokenizer, name, layers_path)
        if not remote and getattr(lm, "dispatched", True) is False:
            lm.dispatch()  # load the real weights now: a local run needs them, and .device should say where
        self.nnsight = lm
        self.model = TracedModel(lm, self.layers_path, remote)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the CPU for remote execution (the server places them), else the first weight's device."""
        return torch.device("cpu") if self.model.remote else super().device

    def residual_norms(self) -> Tensor:
        """Mean residual norm per layer [n_layers] on fixed neutral text, read in one trace."""
        if self._norms is None:
            enc = self.encode(list(NORM_TEXTS))
            remote = self.model.remote
            self._norms = nns.mean_norms(self.nnsight, enc.input_ids, enc.attention_mask, self.layers_path, remote)
        return self._norms

    def capture(self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at="last"):
        """Residual stream ``{layer: [B, d]}`` at decoder-block outputs, read in one trace (open steering applies)."""
        enc = prompts if isinstance(prompts, Encoded) else self.encode(prompts)
        layers = range(self.n_layers) if layers == "all" else layers
        return nns.capture(
            self.nnsight, enc.input_ids, enc.attention_mask, layers, at, self.layers_path,
            list(self.model.plans), self.model.remote,
        )  # fmt: skip

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every call of ``.model`` inside runs as a steered trace; closed on exit and on errors."""
        plan = Plan(interventions, self.n_layers, self.d_model, layout)
        self.model.plans.append(plan)
        try:
            yield plan.tracker
        finally:
            self.model.plans.remove(plan)


def hf_module(model: SteeringModel) -> nn.Module:
    """The Hugging Face model under any backend's ``SteeringModel``."""
    return model.model.module if isinstance(model.model, TracedModel) else model.model


def wrap_backend(model: SteeringModel, backend: str, eager_attention: bool = False) -> SteeringModel:
    """``model`` re-wrapped to run through ``backend`` (one of ``BACKENDS``); the Hugging Face model is shared.

    Wrapping in TransformerLens replaces the model's blocks with bridge components in place (numbers unchanged).
    ``eager_attention=True`` keeps TransformerLens's eager attention (for attention-pattern hooks).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if model.backend == backend:
        return model
    module = hf_module(model)
    if backend == "hf":
        return SteeringModel(module, model.tokenizer, model.name, model.layers_path)
    if backend == "transformer_lens":
        bridge = getattr(model, "bridge", None) or tl.boot(module, model.tokenizer, eager_attention)
        return TransformerLensModel(bridge, model.tokenizer, model.name, model.layers_path)
    return NNsightModel(nns.wrap(module, model.tokenizer), model.tokenizer, model.name, model.layers_path)


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
