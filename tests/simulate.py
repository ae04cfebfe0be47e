"""Synthetic sweep rows for the analysis and report tests (moved here from steering.analysis: only tests use it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import special as _sp

from steering.analysis import BASELINE_DRIVER, CONTROL_PREFIX
from steering.store import KEY_COLUMNS


def simulate_rows(
    drivers: Mapping[str, tuple[float, float]] | None = None,
    *,
    layers: Sequence[int] = (12,),
    layer_scale: Mapping[int, float] | None = None,
    coefficients: Sequence[float] = (-4.0, 4.0, 8.0, 16.0),
    n_controls: int = 2,
    n_questions: int = 40,
    seeds: Sequence[int] = (0, 1, 2),
    intercept: float = -0.5,
    monitored: float = 1.0,
    question_sd: float = 0.0,
    outcome: str = "bernoulli",
    unjudged: float = 0.0,
    seed: int = 0,
    run: str = "synthetic",
    model: str = "toy",
    variant: str = "base",
    scorer: str = "synthetic",
) -> pd.DataFrame:
    """Result rows drawn from the decomposition model with planted effects: for tests, docs, report previews.

    drivers maps name -> (beta, gamma) per unit coefficient (scaled by layer_scale[layer], default 1);
    controls "random-i" get (0, 0). outcome "bernoulli" draws 0/1, "probability" stores P(comply) exactly.
    Baseline rows use driver "none", layer -1, coefficient 0.
    """
    if outcome not in ("bernoulli", "probability"):
        raise ValueError(f"outcome must be 'bernoulli' or 'probability', got {outcome!r}")
    if drivers is None:
        drivers = {"values": (0.02, 0.06), "goal_guarding": (0.0, 0.04), "sycophancy": (0.03, -0.05)}
    effects = dict(drivers)
    effects.update({f"{CONTROL_PREFIX}-{i}": (0.0, 0.0) for i in range(n_controls)})
    rng = np.random.default_rng(seed)
    q_effect = rng.normal(0.0, question_sd, n_questions)
    cells = [(BASELINE_DRIVER, -1, 0.0)]
    cells += [(d, int(lay), float(c)) for d in effects for lay in layers for c in coefficients]
    records = []
    for drv, lay, c in cells:
        beta, gamma = effects.get(drv, (0.0, 0.0))
        s = 1.0 if layer_scale is None else float(layer_scale.get(lay, 1.0))
        for sd in seeds:
            for cond in ("monitored", "unmonitored"):
                m = 1.0 if cond == "monitored" else 0.0
                eta = intercept + q_effect + m * monitored + c * s * (beta + m * gamma)
                prob = _sp.expit(eta)
                comp = rng.binomial(1, prob).astype(float) if outcome == "bernoulli" else prob
                if unjudged > 0:
                    comp = np.where(rng.random(n_questions) < unjudged, np.nan, comp)
                for q in range(n_questions):
                    records.append((run, model, drv, lay, c, variant, cond, f"q{q:03d}", int(sd), scorer, comp[q]))
    df = pd.DataFrame(records, columns=[*KEY_COLUMNS, "compliance"])
    df["extra"] = "{}"
    return df
