"""Coefficients: the one conversion from norm-relative to absolute."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def relative_scale(vector: Tensor, residual_norm: float, where: str = "") -> float:
    """The factor that turns a norm-relative coefficient into an absolute one for ``vector`` [d_model] at a layer
    whose mean residual norm is ``residual_norm``: the added ``absolute x vector`` then has norm
    ``relative x residual_norm``, so one coefficient means the same on models whose residual scales differ.

    The norm is computed in float64 (a float32 norm of a vector with entries near 1e38 overflows to inf and would
    make the scale 0, so "steered" rows would silently equal the baseline); a scale that is 0, not finite or beyond
    float32 is refused. ``where`` (e.g. ``"driver 'values' at layer 9"``) goes into the messages."""
    at = f" ({where})" if where else ""
    if vector.dim() != 1:
        raise ValueError(f"relative coefficients need a [d_model] vector{at}, got shape {tuple(vector.shape)}")
    norm = float(vector.detach().double().norm())
    if norm == 0.0:
        raise ValueError(f"relative coefficients need a non-zero vector{at}: this vector is zero")
    scale = float(residual_norm) / norm
    if not math.isfinite(scale) or scale == 0.0 or scale > FLOAT32_MAX:
        raise ValueError(
            f"the relative scale of this vector{at} is {scale:g} (residual norm {float(residual_norm):g} / vector "
            f"norm {norm:g}), which float32 cannot hold; rescale the vector (e.g. normalize='unit')"
        )
    return scale
