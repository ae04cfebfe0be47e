"""An intervention: what to do to the residual stream at one layer (add, ablate or ablate-then-add a direction)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layers import resolve_layer
from .positions import Positions

OPERATIONS = ("add", "ablate", "ablate_then_add")
MAX_ADDED = 1e6
"""Largest ``|coefficient x vector entry|`` an intervention may add to the residual stream. Far above any
meaningful steering (residual-stream entries of the models we know stay below ~1e4), and far below where a norm
layer squaring the stream overflows float32 (~1e19): beyond it a model returns NaN / empty text, not a result."""


@dataclass
class Intervention:
    """Add ``coefficient * vector`` (or project ``vector`` out) at the output of decoder block ``layer``.

    ``vector`` [d_model]; ``coefficient``: a scalar or one value per batch row [B]; ``positions``: a mode
    (``all``, ``prompt``, ``response``, ``generated``) or explicit row-position ranges; ``operation``: one of
    ``OPERATIONS``. Coefficients here are absolute; ``SteeringModel.intervention(..., relative=True)`` converts
    norm-relative ones. A ``Plan`` applies interventions; this class only holds and checks them.
    """

    layer: int
    vector: Tensor
    coefficient: float | Sequence[float] | Tensor = 1.0
    positions: str | Positions | Sequence = "all"
    operation: str = "add"

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; use one of {', '.join(OPERATIONS)}")
        vector = torch.as_tensor(self.vector)
        if vector.dim() != 1:
            raise ValueError(f"vector must have shape [d_model], got {tuple(vector.shape)}; pass one layer's vector")
        peak = float(vector.detach().abs().max().double()) if vector.numel() else 0.0  # one host sync for both checks
        if not math.isfinite(peak):
            raise ValueError(f"vector for layer {self.layer} contains NaN or inf; recompute or reload a finite vector")
        if self.operation != "add" and float(vector.norm()) == 0.0:
            raise ValueError("cannot ablate a zero vector: its direction is undefined; pass a non-zero vector")
        self.vector = vector
        self.positions = Positions.parse(self.positions)
        coef = self.coefficient
        if isinstance(coef, numbers.Real) or getattr(coef, "ndim", None) == 0:  # numpy scalars, 0-d arrays / tensors
            coef = float(coef)
            if not math.isfinite(coef):
                raise ValueError(f"coefficient {coef} is not finite; pass a finite number")
            self.coefficient = coef
            top = abs(coef)
        else:
            coef = torch.as_tensor(coef, dtype=torch.float64).flatten()
            if not torch.isfinite(coef).all():
                raise ValueError("per-row coefficients contain NaN or inf; pass finite numbers")
            self.coefficient = coef.to(torch.float32)
            top = float(coef.abs().max()) if coef.numel() else 0.0
        if self.operation != "ablate" and top:
            self._check_magnitude(top, peak)

    def _check_magnitude(self, coefficient: float, peak: float) -> None:
        """Refuse a coefficient whose product with the vector's largest entry exceeds ``MAX_ADDED``."""
        added = coefficient * peak
        if added > MAX_ADDED:
            raise ValueError(
                f"coefficient {coefficient:g} is too large for the vector at layer {self.layer}: it adds up to "
                f"{added:.3g} to a residual-stream entry (limit {MAX_ADDED:g}), where activations overflow to inf / "
                "NaN and outputs come back empty; use a smaller coefficient or a normalised vector"
            )

    @property
    def is_noop(self) -> bool:
        """True when the intervention cannot change anything (add with every coefficient 0)."""
        coef = self.coefficient
        zero = coef == 0.0 if isinstance(coef, float) else bool((coef == 0).all())
        return self.operation == "add" and zero

    def check(self, n_layers: int, d_model: int | None) -> int:
        """Validate against a model; returns the layer index in ``0..n_layers-1`` (see ``resolve_layer``)."""
        layer = resolve_layer(self.layer, n_layers)
        if d_model is not None and self.vector.shape[0] != d_model:
            raise ValueError(
                f"vector for layer {self.layer} has size {self.vector.shape[0]} but the model's d_model is {d_model}; "
                "use a vector extracted from this model"
            )
        return layer
