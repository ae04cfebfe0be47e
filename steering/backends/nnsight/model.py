"""``NNsightModel``: the steering API inside nnsight traces (local or remote execution)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from steering.backends.base import NORM_TEXTS, Encoded, Prompt
from steering.backends.hf import SteeringModel
from steering.backends.nnsight import hooks as nns
from steering.hooks import Intervention, Plan, RowLayout


class TracedModel:
    """Stands in for the Hugging Face model of an ``NNsightModel``: calling it or its ``generate`` runs an nnsight
    trace with the steering contexts that are open; any other attribute is the wrapped model's."""

    def __init__(self, lm, layers_path: str, remote: bool = False):
        self.lm = lm
        self.module = nns.hf_model(lm)
        self.layers_path = layers_path
        self.remote = remote
        self.plans: list[Plan] = []

    def active(self) -> list[Plan]:
        """The open steering contexts entered by the calling thread (or asyncio task), in the order entered."""
        return [plan for plan in self.plans if plan.is_active()]

    def __call__(self, *args, **kwargs):
        return nns.forward(self.lm, self.active(), args, kwargs, self.layers_path, self.remote)

    forward = __call__

    def generate(self, *args, **kwargs) -> Tensor:
        return nns.generate(self.lm, self.active(), args, dict(kwargs), self.layers_path, self.remote)

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
        enc = self._encoded(prompts)
        layers = self._layers(layers)
        return nns.capture(
            self.nnsight, enc.input_ids, enc.attention_mask, layers, at, self.layers_path,
            self.model.active(), self.model.remote,
        )  # fmt: skip

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every call of ``.model`` inside, by the thread (or asyncio task) that entered it, runs as
        a steered trace; closed on exit and on errors. Explicit ranges that touched no token raise on exit."""
        plan = Plan(interventions, self.n_layers, self.d_model, layout)
        scope = plan.scope()  # checked where each trace is dispatched (TracedModel.active), not inside the trace
        self.model.plans.append(plan)
        try:
            yield plan.tracker
        finally:
            self.model.plans.remove(plan)
            scope.remove()
        plan.check_reached()

    @classmethod
    def reads_while_generating(cls) -> bool:
        return False  # generation readouts are verified on plain transformers only

    def hf_module(self) -> nn.Module:
        return self.model.module

    @classmethod
    def convert(cls, model: SteeringModel, eager_attention: bool = False) -> SteeringModel:
        """``model``'s Hugging Face module in an nnsight ``TransformersModel`` (local execution)."""
        return cls(nns.wrap(model.hf_module(), model.tokenizer), model.tokenizer, model.name, model.layers_path)
