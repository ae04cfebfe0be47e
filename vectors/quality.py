"""Per-layer quality of a vector on held-out pairs: projection accuracy and separation, to pick layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .extract import ChatModel, collect_activations
from .pairs import ContrastPair
from .vectorset import VectorSet

COLUMNS = ("layer", "accuracy", "separation", "mean_gap", "n_pairs", "letter_cosine", "worst_group_accuracy")
"""Columns of every quality table; tables of grouped pairs add one ``accuracy_<group>`` column per group."""


def projection_quality(vector: Tensor, pos: Tensor, neg: Tensor) -> dict[str, float]:
    """Quality of ``vector`` [d] on paired activations ``pos`` / ``neg`` [N, d].

    ``accuracy``: share of pairs whose positive projects strictly higher than its negative. ``separation``: Cohen's
    d of the positive vs the negative projections (difference of means over the pooled SD). ``mean_gap``: mean of
    the projection differences. Projections are onto the unit vector.
    """
    unit = vector.double() / vector.double().norm().clamp(min=1e-30)
    p, n = pos.double() @ unit, neg.double() @ unit  # [N]
    pooled = ((p.var(unbiased=False) + n.var(unbiased=False)) / 2).sqrt()
    gap = float((p - n).mean())
    separation = float((p.mean() - n.mean()) / pooled) if float(pooled) > 0 else float("inf") * (1 if gap > 0 else -1)
    return {"accuracy": float((p > n).double().mean()), "separation": separation, "mean_gap": gap}


def letter_direction(pos: Tensor, neg: Tensor, pairs: Sequence[ContrastPair]) -> Tensor | None:
    """The plain letter direction [d]: mean activation of the completions whose answer letter is the first letter
    (A) minus that of the completions with the second (B), positives and negatives alike (with more than two
    letters: the first against all others). None when the completions carry fewer than two letters."""
    rows = torch.cat([pos, neg]).double()
    letters = [p.positive_letter for p in pairs] + [p.negative_letter for p in pairs]
    names = sorted({x for x in letters if x is not None})
    if len(names) < 2:
        return None
    first = torch.tensor([x == names[0] for x in letters])
    other = torch.tensor([x is not None and x != names[0] for x in letters])
    return rows[first].mean(dim=0) - rows[other].mean(dim=0)


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def quality_table(
    vectorset: VectorSet,
    pos: dict[int, Tensor],
    neg: dict[int, Tensor],
    pairs: Sequence[ContrastPair] | None = None,
) -> pd.DataFrame:
    """One row per layer of ``vectorset`` from activations ``{layer: [N, d]}``.

    Columns ``COLUMNS``: ``projection_quality``'s accuracy, separation and mean gap; with ``pairs`` (the pairs
    the activations come from) also ``letter_cosine``, the vector's cosine with the plain letter direction
    (``letter_direction``; near +-1 means the vector mostly encodes which letter was answered, not the concept),
    and the held-out accuracy within each group of ``balance_groups`` (``accuracy_<group>``, e.g. ``accuracy_A``
    for the pairs whose positive answer is (A)) and its minimum ``worst_group_accuracy``: a letter-confounded
    vector scores about 1 in one group and 0 in the other. They are NaN where they do not apply.
    """
    from .extract import balance_groups

    pairs = list(pairs) if pairs is not None else None
    groups = balance_groups(pairs) if pairs else None
    names = sorted(set(groups)) if groups else []
    rows = []
    for layer in vectorset.layers:
        vector, p, n = vectorset[layer], pos[layer], neg[layer]
        stats = projection_quality(vector, p, n)
        row: dict[str, Any] = {"layer": layer, **stats, "n_pairs": int(p.shape[0])}
        letter = letter_direction(p, n, pairs) if pairs else None
        row["letter_cosine"] = _cosine(vector, letter) if letter is not None else float("nan")
        by_group = {}
        for name in names:
            index = torch.tensor([g == name for g in groups])
            by_group[f"accuracy_{name or 'unlabelled'}"] = projection_quality(vector, p[index], n[index])["accuracy"]
        row["worst_group_accuracy"] = min(by_group.values()) if by_group else float("nan")
        rows.append({**row, **by_group})
    extra = [f"accuracy_{name or 'unlabelled'}" for name in names]
    return pd.DataFrame(rows, columns=[*COLUMNS, *extra])


def layer_quality(
    model: ChatModel,
    vectorset: VectorSet,
    pairs: Sequence[ContrastPair],
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """Held-out quality per layer (see ``quality_table``), reading activations at the set's own position."""
    vectorset.check_model(model, strict=False)
    pos, neg = collect_activations(model, pairs, vectorset.layers, vectorset.position, batch_size, progress)
    return quality_table(vectorset, pos, neg, pairs)
