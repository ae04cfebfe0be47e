"""Coefficients: the one conversion from norm-relative to absolute."""

from __future__ import annotations

from torch import Tensor


def relative_scale(vector: Tensor, residual_norm: float) -> float:
    """The factor that turns a norm-relative coefficient into an absolute one for ``vector`` [d_model] at a layer
    whose mean residual norm is ``residual_norm``: the added ``absolute x vector`` then has norm
    ``relative x residual_norm``, so one coefficient means the same on models whose residual scales differ."""
    norm = float(vector.norm())
    if vector.dim() != 1 or norm == 0.0:
        raise ValueError("relative coefficients need a non-zero [d_model] vector")
    return float(residual_norm) / norm
