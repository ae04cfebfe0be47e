"""Interventions on the residual stream: add, ablate, or ablate-then-add a direction at chosen layers and positions."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import find_layers, find_stack
from .positions import Positions, PositionTracker, RowLayout

OPERATIONS = ("add", "ablate", "ablate_then_add")


@dataclass
class Intervention:
    """Add ``coefficient * vector`` (or project ``vector`` out) at the output of decoder block ``layer``.

    ``vector`` [d_model]; ``coefficient``: a scalar or one value per batch row [B]; ``positions``: a mode
    (``all``, ``prompt``, ``response``, ``generated``) or explicit row-position ranges; ``operation``: one of
    ``OPERATIONS``. Coefficients here are absolute; ``steering.SteeringModel`` converts norm-relative ones.
    """

    layer: int
    vector: Tensor
    coefficient: float | Sequence[float] | Tensor = 1.0
    positions: str | Positions | Sequence = "all"
    operation: str = "add"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; use one of {', '.join(OPERATIONS)}")
        vector = torch.as_tensor(self.vector)
        if vector.dim() != 1:
            raise ValueError(f"vector must have shape [d_model], got {tuple(vector.shape)}; pass one layer's vector")
        if not torch.isfinite(vector).all():
            raise ValueError(f"vector for layer {self.layer} contains NaN or inf; recompute or reload a finite vector")
        if self.operation != "add" and float(vector.norm()) == 0.0:
            raise ValueError("cannot ablate a zero vector: its direction is undefined; pass a non-zero vector")
        self.vector = vector
        self.positions = Positions.parse(self.positions)
        coef = self.coefficient
        if isinstance(coef, (int, float)):
            if not math.isfinite(coef):
                raise ValueError(f"coefficient {coef} is not finite; pass a finite number")
            self.coefficient = float(coef)
        else:
            coef = torch.as_tensor(coef, dtype=torch.float32).flatten()
            if not torch.isfinite(coef).all():
                raise ValueError("per-row coefficients contain NaN or inf; pass finite numbers")
            self.coefficient = coef

    @property
    def is_noop(self) -> bool:
        """True when the intervention cannot change anything (add with every coefficient 0)."""
        coef = self.coefficient
        zero = coef == 0.0 if isinstance(coef, float) else bool((coef == 0).all())
        return self.operation == "add" and zero

    def _on(self, like: Tensor) -> tuple[Tensor, Tensor | float]:
        """The vector and coefficient on ``like``'s device and dtype (cached: one copy per device/dtype)."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            vector = self.vector.to(device=like.device, dtype=like.dtype)
            coef = self.coefficient
            if isinstance(coef, Tensor):
                coef = coef.to(device=like.device, dtype=like.dtype)
            self._cache[key] = (vector, coef)
        return self._cache[key]

    def apply(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Return the intervened residual stream; ``hidden`` [B, T, d], ``mask`` [B, T] bool."""
        if self.is_noop:
            return hidden
        vector, coef = self._on(hidden)
        weight = mask.to(device=hidden.device, dtype=hidden.dtype)  # [B, T]
        if isinstance(coef, Tensor):
            if coef.shape[0] != hidden.shape[0]:
                raise ValueError(
                    f"{coef.shape[0]} per-row coefficients but the batch has {hidden.shape[0]} rows; pass one "
                    "coefficient per row (or a scalar)"
                )
            scale = coef[:, None] * weight
        else:
            scale = coef * weight
        if self.operation != "add":
            unit = vector / vector.norm()
            hidden = hidden - ((hidden @ unit) * weight)[..., None] * unit
        if self.operation != "ablate":
            hidden = hidden + scale[..., None] * vector
        return hidden


def _replace_hidden(output: Tensor | tuple, hidden: Tensor) -> Tensor | tuple:
    # transformers 5 decoder blocks return a plain tensor; older ones and some architectures a tuple.
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def hidden_of(output: Tensor | tuple) -> Tensor:
    """The residual stream [B, T, d] in a decoder block's output."""
    return output[0] if isinstance(output, tuple) else output


def check_interventions(interventions: Sequence[Intervention], n_layers: int, d_model: int | None) -> None:
    """Raise a ValueError naming the fix for a layer out of range or a vector of the wrong size."""
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise ValueError(f"expected Intervention objects, got {type(iv).__name__}")
        if not -n_layers <= iv.layer < n_layers:
            raise ValueError(f"layer {iv.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if d_model is not None and iv.vector.shape[0] != d_model:
            raise ValueError(
                f"vector for layer {iv.layer} has size {iv.vector.shape[0]} but the model's d_model is {d_model}; "
                "use a vector extracted from this model"
            )


def model_d_model(model: nn.Module) -> int | None:
    """Residual-stream width from the model config (text config for multimodal wrappers)."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None


@contextmanager
def steer(
    model: nn.Module,
    interventions: Intervention | Sequence[Intervention],
    layout: RowLayout | None = None,
    layers_path: str | None = None,
) -> Iterator[PositionTracker]:
    """Apply ``interventions`` to every forward pass inside the block; all hooks are removed on exit or error."""
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    layers = find_layers(model, layers_path)
    check_interventions(ivs, len(layers), model_d_model(model))
    for iv in ivs:
        if iv.positions.needs() == "response_start" and (layout is None or layout.response_start is None):
            raise ValueError(
                "positions='response' needs where the assistant turn starts: encode chat prompts with "
                "model.encode(messages) and pass its layout, or pass RowLayout(response_start=...)"
            )
    tracker = PositionTracker(layout, [iv.positions for iv in ivs])
    by_layer: dict[int, list[Intervention]] = {}
    for iv in ivs:
        by_layer.setdefault(iv.layer % len(layers), []).append(iv)

    def make_hook(group: list[Intervention]):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
            hidden = hidden_of(output)
            for iv in group:
                hidden = iv.apply(hidden, tracker.mask(iv.positions))
            return _replace_hidden(output, hidden)

        return hook

    handles = tracker.attach(model, find_stack(model, layers_path))
    try:
        for index, group in sorted(by_layer.items()):
            handles.append(layers[index].register_forward_hook(make_hook(group)))
        yield tracker
    finally:
        for handle in handles:
            handle.remove()
