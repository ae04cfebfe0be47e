"""``TransformerLensModel``: the steering API over a TransformerLens ``TransformerBridge``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from steering.backends.base import Encoded, Prompt
from steering.backends.hf import SteeringModel
from steering.backends.transformer_lens import hooks as tl
from steering.hooks import Intervention, RowLayout


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
        enc = self._encoded(prompts)
        layers = self._layers(layers)
        return tl.capture(self.bridge, enc.input_ids, enc.attention_mask, layers, at, self.layers_path)

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every forward inside is steered through bridge hooks; removed on exit and on errors."""
        with tl.steer(self.bridge, interventions, layout, self.layers_path) as tracker:
            yield tracker

    @classmethod
    def reads_while_generating(cls) -> bool:
        return False  # generation readouts are verified on plain transformers only

    @classmethod
    def convert(cls, model: SteeringModel, eager_attention: bool = False) -> SteeringModel:
        """``model``'s Hugging Face module in a TransformerLens bridge (booted in place: its blocks become bridge
        components, numbers unchanged); ``eager_attention=True`` keeps TransformerLens's eager attention."""
        bridge = getattr(model, "bridge", None) or tl.boot(model.hf_module(), model.tokenizer, eager_attention)
        return cls(bridge, model.tokenizer, model.name, model.layers_path)
