"""Per-layer quality of a vector on held-out pairs: projection accuracy and separation, to pick layers."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from torch import Tensor

from .extract import ChatModel, collect_activations
from .pairs import ContrastPair
from .vectorset import VectorSet

COLUMNS = ("layer", "accuracy", "separation", "mean_gap", "n_pairs")


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


def quality_table(vectorset: VectorSet, pos: dict[int, Tensor], neg: dict[int, Tensor]) -> pd.DataFrame:
    """One row per layer of ``vectorset`` (columns ``COLUMNS``) from activations ``{layer: [N, d]}``."""
    rows = []
    for layer in vectorset.layers:
        stats = projection_quality(vectorset[layer], pos[layer], neg[layer])
        rows.append({"layer": layer, **stats, "n_pairs": int(pos[layer].shape[0])})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def layer_quality(
    model: ChatModel,
    vectorset: VectorSet,
    pairs: Sequence[ContrastPair],
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """Held-out quality per layer (see ``projection_quality``), reading activations at the set's own position."""
    vectorset.check_model(model, strict=False)
    pos, neg = collect_activations(model, pairs, vectorset.layers, vectorset.position, batch_size, progress)
    return quality_table(vectorset, pos, neg)
