"""Extraction methods: each maps paired activations ``(pos [N, d], neg [N, d])`` to one direction ``[d]``.

All return float32; ``pca`` and ``probe`` are scaled to the mean difference's projection on their direction, so the
three methods give vectors of comparable size before normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Method = Callable[[Tensor, Tensor], Tensor]


def _check(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 2 or pos.shape != neg.shape:
        raise ValueError(
            f"pos and neg must both be [N, d] with the same shape, got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.shape[0] == 0:
        raise ValueError("no activations: pass at least one contrast pair")


def mean_diff(pos: Tensor, neg: Tensor) -> Tensor:
    """CAA: ``mean(pos) - mean(neg)`` [d]."""
    _check(pos, neg)
    return (pos.double().mean(dim=0) - neg.double().mean(dim=0)).float()


def _scaled_like_mean(direction: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """``direction`` [d] made unit, signed to agree with the mean difference and scaled to its projection on it."""
    mean = (pos.double().mean(dim=0) - neg.double().mean(dim=0)).to(direction.dtype)
    unit = direction / direction.norm().clamp(min=1e-30)
    projection = torch.dot(mean, unit)
    if projection < 0:
        unit, projection = -unit, -projection
    return (unit * projection).float()


def pca(pos: Tensor, neg: Tensor) -> Tensor:
    """First principal component of the paired differences ``pos - neg`` (uncentred, so the shared shift counts),
    sign agreeing with the mean difference, scaled to the mean difference's projection on it. [d]"""
    _check(pos, neg)
    diffs = pos.double() - neg.double()  # [N, d]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled_like_mean(vh[0], pos, neg)


def probe(pos: Tensor, neg: Tensor, l2: float = 1.0, max_iter: int = 200) -> Tensor:
    """Logistic-regression direction separating pos (1) from neg (0). [d]

    Features are standardised, the weights fit with an L2 penalty ``l2 * |w|^2 / (2 * n)`` (like scikit-learn's
    ``C=1/l2``) by L-BFGS, then mapped back to the raw activation space (``w / std``); scaled like ``pca``.
    """
    _check(pos, neg)
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (the regularisation keeps separable data finite), got {l2}")
    x = torch.cat([pos, neg]).double()  # [2N, d]
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * (w @ w) / (2 * len(y))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    raw = w.detach() / sd
    if float(raw.norm()) == 0.0:
        raise ValueError("the probe found no separating direction (all weights 0); check that pos and neg differ")
    return _scaled_like_mean(raw, pos, neg)


METHODS: dict[str, Method] = {"mean_diff": mean_diff, "pca": pca, "probe": probe}


def get_method(method: str | Method) -> tuple[str, Method]:
    """(name, function) for a registered method name or any ``(pos, neg) -> [d]`` callable."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; use one of {', '.join(METHODS)} or pass a (pos, neg) -> [d] callable"
        )
    return method, METHODS[method]
