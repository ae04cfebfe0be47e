"""Can the instrument see anything? Letter mass, unjudged shares and chance baselines, per sweep cell.

A forced-choice compliance is P(compliant letter) / (P(A) + P(B)). When steering pushes the model off the answer
format, P(A) + P(B) (the *letter mass*) collapses and the ratio of two tiny numbers still looks like a compliance
near 0.5. And when the unsteered model picks letters without regard to which answer is which, every compliance
is ~0.5 and a gap of 0 means "blind", not "no effect". This module finds both, so the analysis drops or flags such
cells instead of reporting them as results:

- a cell is **invalid** when its mean letter mass is below ``MIN_MASS_RATIO`` x the unsteered cell's (forced
  choice), or when more than ``MAX_UNJUDGED`` of its rows have no verdict (judged runs);
- a baseline is **at chance** when its mean decisiveness ``|2 * compliance - 1|`` (0: the choice ignores the
  answers' content, 1: always the same answer) is below ``CHANCE_DECISIVENESS``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from steering.baseline import BASELINE_DRIVER
from steering.spec import FORCED_CHOICE
from steering.stats import CELL_COLUMNS, CONTEXT_COLUMNS

MIN_MASS_RATIO = 0.5
"""A steered cell keeps its compliance only if its letter mass is at least this share of the unsteered mass."""
MAX_UNJUDGED = 0.2
"""A judged cell with more than this share of rows without a verdict is not reported."""
CHANCE_DECISIVENESS = 0.1
"""Below this mean |2 * compliance - 1| the unsteered model's choice does not depend on the answers: at chance."""


def letter_mass(df: pd.DataFrame) -> pd.Series:
    """Each row's letter mass P(A) + P(B) (from ``extra``; a ``letter_mass`` column if present), NaN if none."""
    if "letter_mass" in df.columns:
        return df["letter_mass"].astype(float)
    if "extra" not in df.columns:
        return pd.Series(np.nan, index=df.index)
    return df["extra"].map(lambda e: json.loads(e or "{}").get("letter_mass", np.nan)).astype(float)


def _context(df: pd.DataFrame) -> list[str]:
    return [c for c in CONTEXT_COLUMNS if c in df.columns]


def cell_validity(
    df: pd.DataFrame, min_mass_ratio: float = MIN_MASS_RATIO, max_unjudged: float = MAX_UNJUDGED
) -> pd.DataFrame:
    """Per (context, driver, layer, coefficient): ``letter_mass``, ``baseline_mass``, ``mass_ratio``,
    ``unjudged_share``, ``valid`` and ``reason`` (empty when valid)."""
    ctx, cell = _context(df), list(CELL_COLUMNS)
    frame = df.assign(_mass=letter_mass(df), _unjudged=df["compliance"].isna().astype(float))
    out = frame.groupby([*ctx, *cell], sort=True, dropna=False).agg(
        letter_mass=("_mass", "mean"), unjudged_share=("_unjudged", "mean")
    )
    out = out.reset_index()
    base = out[out["driver"] == BASELINE_DRIVER][[*ctx, "letter_mass"]].rename(columns={"letter_mass": "baseline_mass"})
    out = out.merge(base, on=ctx, how="left") if ctx else out.assign(baseline_mass=base["baseline_mass"].mean())
    out["mass_ratio"] = out["letter_mass"] / out["baseline_mass"]
    low_mass = out["mass_ratio"] < min_mass_ratio  # NaN (no letter mass: judged rows) compares False
    unjudged = out["unjudged_share"] > max_unjudged
    out["valid"] = ~(low_mass | unjudged)
    out["reason"] = np.where(
        low_mass,
        [
            f"letter mass {m:.3f} < {min_mass_ratio:g} x unsteered {b:.3f}"
            for m, b in zip(out.letter_mass, out.baseline_mass)
        ],
        np.where(unjudged, [f"{u:.0%} of rows unjudged > {max_unjudged:.0%}" for u in out.unjudged_share], ""),
    )
    return out


def valid_rows(
    df: pd.DataFrame, min_mass_ratio: float = MIN_MASS_RATIO, max_unjudged: float = MAX_UNJUDGED
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of valid cells, the invalid cells with their reasons). The baseline is never dropped here; a baseline
    at chance is reported by ``chance_note``."""
    cells = cell_validity(df, min_mass_ratio, max_unjudged)
    bad = cells[~cells["valid"] & (cells["driver"] != BASELINE_DRIVER)]
    if bad.empty:
        return df, bad
    keys = [*_context(df), *CELL_COLUMNS]
    marked = df.merge(bad[keys].assign(_drop=True), on=keys, how="left")
    keep = marked["_drop"].isna().to_numpy()
    return df[keep], bad.reset_index(drop=True)


def _baseline(df: pd.DataFrame) -> pd.DataFrame:
    """The unsteered rows (all rows of a frame without a ``driver`` column, e.g. ``measure_gap``'s)."""
    return df[df["driver"] == BASELINE_DRIVER] if "driver" in df.columns else df


def decisiveness(df: pd.DataFrame) -> float:
    """Mean |2 * compliance - 1| over the unsteered rows (NaN if none)."""
    base = _baseline(df)
    base = base[base["compliance"].notna()]
    return float((2 * base["compliance"] - 1).abs().mean()) if len(base) else float("nan")


def chance_note(df: pd.DataFrame, threshold: float = CHANCE_DECISIVENESS, max_unjudged: float = MAX_UNJUDGED) -> str:
    """One line when the unsteered baseline cannot show a gap (empty otherwise): forced choice at chance, or a
    judged baseline with too many rows unjudged."""
    base = _baseline(df)
    if base.empty:
        return ""
    unjudged = float(base["compliance"].isna().mean())
    if unjudged > max_unjudged:
        return (
            f"Baseline not reportable: {unjudged:.0%} of its rows have no verdict (more than {max_unjudged:.0%}); "
            "rerun to judge them again, or check the judge."
        )
    scorer = set(base["scorer"]) if "scorer" in base.columns else {FORCED_CHOICE}
    value = decisiveness(base)
    if scorer == {FORCED_CHOICE} and value < threshold:
        return (
            f"Baseline at chance: the unsteered model's choice does not depend on which answer is which (mean "
            f"|2·compliance − 1| = {value:.3f} < {threshold:g} over {int(base['compliance'].notna().sum())} rows), "
            "so this scorer cannot see a gap on this model; no gap is reported. Use a model it can see (e.g. "
            "load_model('organism'), a known positive) to check the setup."
        )
    return ""
