"""Extraction methods: each maps paired activations ``(pos [N, d], neg [N, d])`` to one direction ``[d]``.

All return float32; ``pca`` and ``probe`` are scaled to the mean difference's projection on their direction, so the
three methods give vectors of comparable size before normalisation.

Every method also takes an optional keyword ``groups`` (one label per pair, e.g. the letter of the positive answer
on A/B data): the pairs are then weighted so that each group counts equally, whatever its size. On A/B data whose
matching answer is (A) for some pairs and (B) for others, the activation at the answer letter carries a large
A-minus-B letter direction; with unequal groups a plain mean difference keeps a share of it (all of it in the
extreme), while the group-balanced mean difference -- the mean over groups of each group's mean ``pos - neg`` --
cancels it exactly, because the letter enters the two groups with opposite signs. ``extract`` passes the groups
(``ContrastPair.balance_group``) by default. A custom method may accept ``groups`` too; one that does not is called
with ``(pos, neg)`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

Method = Callable[..., Tensor]
"""``method(pos [N, d], neg [N, d], *, groups=None) -> [d]`` (``groups`` optional)."""


def _check(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 2 or pos.shape != neg.shape:
        raise ValueError(
            f"pos and neg must both be [N, d] with the same shape, got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.shape[0] == 0:
        raise ValueError("no activations: pass at least one contrast pair")


def group_weights(groups: Sequence[Hashable] | None, n: int) -> Tensor:
    """Per-pair weights [n] (float64, summing to 1) that give each group the same total weight: ``1 / (G * n_g)``
    for a pair of group g (G groups); uniform ``1 / n`` without groups."""
    if groups is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for {n} pairs; give one label per pair")
    counts: dict[Hashable, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    return torch.tensor([1.0 / (len(counts) * counts[g]) for g in groups], dtype=torch.float64)


def _weighted_mean_diff(pos: Tensor, neg: Tensor, groups: Sequence[Hashable] | None) -> Tensor:
    w = group_weights(groups, pos.shape[0])
    return w @ (pos.double() - neg.double())  # [d] float64


def mean_diff(pos: Tensor, neg: Tensor, *, groups: Sequence[Hashable] | None = None) -> Tensor:
    """CAA: ``mean(pos) - mean(neg)`` [d]; with ``groups``, the mean over groups of each group's mean difference."""
    _check(pos, neg)
    return _weighted_mean_diff(pos, neg, groups).float()


def _scaled_like_mean(direction: Tensor, pos: Tensor, neg: Tensor, groups: Sequence[Hashable] | None) -> Tensor:
    """``direction`` [d] made unit, signed to agree with the (group-balanced) mean difference and scaled to its
    projection on it."""
    mean = _weighted_mean_diff(pos, neg, groups).to(direction.dtype)
    unit = direction / direction.norm().clamp(min=1e-30)
    projection = torch.dot(mean, unit)
    if projection < 0:
        unit, projection = -unit, -projection
    return (unit * projection).float()


def pca(pos: Tensor, neg: Tensor, *, groups: Sequence[Hashable] | None = None) -> Tensor:
    """First principal component of the paired differences ``pos - neg`` (uncentred, so the shared shift counts),
    sign agreeing with the mean difference, scaled to the mean difference's projection on it. [d]

    With ``groups`` each group weighs equally in the second moment and in the mean difference. (Weighting removes
    the letter's pull on the sign and scale, not the letter axis itself: when the letter direction is larger than
    the concept, the first component of mixed-letter differences can still be the letter axis. Check
    ``layer_quality``'s ``letter_cosine``.)"""
    _check(pos, neg)
    w = group_weights(groups, pos.shape[0])
    diffs = (pos.double() - neg.double()) * w.sqrt()[:, None]  # [N, d]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled_like_mean(vh[0], pos, neg, groups)


def probe(
    pos: Tensor,
    neg: Tensor,
    l2: float = 1.0,
    max_iter: int = 200,
    *,
    groups: Sequence[Hashable] | None = None,
) -> Tensor:
    """Logistic-regression direction separating pos (1) from neg (0). [d]

    Features are standardised, the weights fit with an L2 penalty ``l2 * |w|^2 / (2 * n)`` (like scikit-learn's
    ``C=1/l2``) by L-BFGS, then mapped back to the raw activation space (``w / std``); scaled like ``pca``. With
    ``groups`` the samples are weighted so that each group counts equally.
    """
    _check(pos, neg)
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (the regularisation keeps separable data finite), got {l2}")
    x = torch.cat([pos, neg]).double()  # [2N, d]
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    pair_w = group_weights(groups, pos.shape[0]) * pos.shape[0]  # mean 1
    sample_w = torch.cat([pair_w, pair_w])
    mu = (sample_w[:, None] * x).sum(dim=0) / sample_w.sum()
    sd = ((sample_w[:, None] * (x - mu) ** 2).sum(dim=0) / sample_w.sum()).sqrt().clamp(min=1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=sample_w)
        loss = loss + l2 * (w @ w) / (2 * len(y))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    raw = w.detach() / sd
    if float(raw.norm()) == 0.0:
        raise ValueError("the probe found no separating direction (all weights 0); check that pos and neg differ")
    return _scaled_like_mean(raw, pos, neg, groups)


METHODS: dict[str, Method] = {"mean_diff": mean_diff, "pca": pca, "probe": probe}


def accepts_groups(method: Method) -> bool:
    """True when ``method`` takes a ``groups`` keyword (or any keyword)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "groups" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def get_method(method: str | Method) -> tuple[str, Method]:
    """(name, function) for a registered method name or any ``(pos, neg) -> [d]`` callable."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; use one of {', '.join(METHODS)} or pass a (pos, neg) -> [d] callable"
        )
    return method, METHODS[method]
