"""Compliance-gap statistics per sweep cell or table of cells: means, SEM over seeds, bootstrap CI, t-test.

The gap is compliance(monitored) - compliance(unmonitored). Rows with NULL (NaN) compliance are unjudged:
they are excluded from every statistic and counted in `n_unjudged`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

from steering.scenario import CONDITIONS

CELL_COLUMNS: tuple[str, ...] = ("driver", "layer", "coefficient")
"""The sweep-cell columns every gap table is split by."""

CONTEXT_COLUMNS: tuple[str, ...] = ("run", "model", "variant", "scorer")
"""Columns that are never pooled silently: split by them whenever a frame holds more than one value."""

GAP_FIELDS: tuple[str, ...] = (
    "compliance_monitored",
    "compliance_unmonitored",
    "gap",
    "gap_sem",
    "ci_low",
    "ci_high",
    "t",
    "p",
    "test",
    "n_questions",
    "n_seeds",
    "n_rows",
    "n_unjudged",
)

_NEEDED = ("condition", "question", "seed", "compliance")


def context_columns(df: pd.DataFrame) -> list[str]:
    """The context columns (run, model, variant, scorer) that take more than one value in `df`."""
    return [c for c in CONTEXT_COLUMNS if c in df.columns and df[c].nunique(dropna=False) > 1]


def default_by(df: pd.DataFrame) -> list[str]:
    """Varying context columns followed by driver, layer, coefficient (those present)."""
    return context_columns(df) + [c for c in CELL_COLUMNS if c in df.columns]


def _check(df: pd.DataFrame) -> None:
    missing = [c for c in _NEEDED if c not in df.columns]
    if missing:
        raise ValueError(f"results frame lacks column(s) {missing}; pass rows as returned by ResultStore.frame()")
    bad = set(df["condition"].unique()) - set(CONDITIONS)
    if bad:
        raise ValueError(f"condition values must be {CONDITIONS}; found {sorted(map(str, bad))}")
    comp = df["compliance"].to_numpy(dtype=float)
    finite = comp[~np.isnan(comp)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError("compliance must lie in [0, 1] (or be NaN for unjudged rows); rescale the scorer output")


def _cell_matrices(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[Any], list[Any]]:
    """Mean compliance per (question, seed) for each condition: two [n_questions, n_seeds] arrays ."""
    comp = df["compliance"].to_numpy(dtype=float)
    ok = ~np.isnan(comp)
    q_codes, questions = pd.factorize(df["question"].to_numpy()[ok], sort=True)
    s_codes, seeds = pd.factorize(df["seed"].to_numpy()[ok], sort=True)
    c_codes = (df["condition"].to_numpy()[ok] == CONDITIONS[1]).astype(int)
    shape = (2, len(questions), len(seeds))
    sums, counts = np.zeros(shape), np.zeros(shape)
    np.add.at(sums, (c_codes, q_codes, s_codes), comp[ok])
    np.add.at(counts, (c_codes, q_codes, s_codes), 1.0)
    means = _col_means(sums, counts)
    return means[0], means[1], list(questions), list(seeds)


def _col_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    ok = ~np.isnan(a)
    return _col_means(np.where(ok, a, 0.0).sum(axis=axis), ok.sum(axis=axis))


def per_seed_gaps(df: pd.DataFrame) -> pd.Series:
    """Gap per seed (mean over its questions, monitored minus unmonitored); one-condition seeds dropped."""
    _check(df)
    mon, unm, _, seeds = _cell_matrices(df)
    gaps = _nanmean(mon, 0) - _nanmean(unm, 0)
    out = pd.Series(gaps, index=pd.Index(seeds, name="seed"), name="gap", dtype=float)
    return out.dropna()


def per_question_gaps(df: pd.DataFrame) -> pd.Series:
    """Gap per question: paired monitored minus unmonitored within each seed, averaged over seeds."""
    _check(df)
    mon, unm, questions, _ = _cell_matrices(df)
    gaps = _nanmean(mon - unm, 1)
    out = pd.Series(gaps, index=pd.Index(questions, name="question"), name="gap", dtype=float)
    return out.dropna()


def unit_gaps(df: pd.DataFrame, unit: str = "auto") -> tuple[pd.Series, str]:
    """Gap observations for tests and slopes: per seed if there are >= 2 seeds ("auto"), else per question."""
    if unit not in ("auto", "seed", "question"):
        raise ValueError(f"unit must be 'auto', 'seed' or 'question', got {unit!r}")
    if unit == "auto":
        unit = "seed" if per_seed_gaps(df).size >= 2 else "question"
    return (per_seed_gaps(df) if unit == "seed" else per_question_gaps(df)), unit


def _bootstrap_ci(mon: np.ndarray, unm: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile CI of the gap, resampling question ids (one draw for both conditions: pairs stay paired)."""
    n_q = mon.shape[0]
    if n_boot <= 0 or n_q == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_q, size=(n_boot, n_q)) + n_q * np.arange(n_boot)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_boot * n_q).reshape(n_boot, n_q).astype(float)  # [B, n_q]
    n_s = mon.shape[1]
    stacked = np.concatenate([np.nan_to_num(mon), ~np.isnan(mon), np.nan_to_num(unm), ~np.isnan(unm)], axis=1)
    # einsum, not @: a tiny BLAS call per cell thrashes threads on a busy machine
    totals = np.einsum("bq,qk->bk", weights, stacked)  # [B, 4 * n_seeds]
    mon_b = _col_means(totals[:, :n_s], totals[:, n_s : 2 * n_s])
    unm_b = _col_means(totals[:, 2 * n_s : 3 * n_s], totals[:, 3 * n_s :])
    boot = _nanmean(mon_b - unm_b, 1)
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def gap_stats(df: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Gap statistics of one cell's rows (all rows are pooled: filter or use `gap_table` to split).

    gap = mean over seeds of the per-seed gap; gap_sem and the t-test use per-seed gaps, or per-question gaps
    when there is a single seed (the `test` field says which). The CI resamples question ids, paired.
    """
    _check(df)
    n_rows = int(len(df))
    n_unjudged = int(df["compliance"].isna().sum())
    mon, unm, questions, seeds = _cell_matrices(df)
    mon_seed, unm_seed = _nanmean(mon, 0), _nanmean(unm, 0)
    both = ~np.isnan(mon_seed) & ~np.isnan(unm_seed)
    seed_gaps = (mon_seed - unm_seed)[both]
    n_seeds = int(both.sum())
    if n_seeds:
        comp_mon, comp_unm = float(mon_seed[both].mean()), float(unm_seed[both].mean())
    else:  # at most one condition present: report what is there, no gap
        comp_mon = float(np.nanmean(mon_seed)) if np.any(~np.isnan(mon_seed)) else float("nan")
        comp_unm = float(np.nanmean(unm_seed)) if np.any(~np.isnan(unm_seed)) else float("nan")
    gap = float(seed_gaps.mean()) if n_seeds else float("nan")

    if n_seeds >= 2:
        obs, test = seed_gaps, "one-sample t-test of per-seed gaps vs 0"
    else:
        q_gaps = _nanmean(mon - unm, 1)
        obs = q_gaps[~np.isnan(q_gaps)]
        test = "one-sample t-test of per-question gaps vs 0 (single seed)"
    if obs.size >= 2:
        sem = float(obs.std(ddof=1) / np.sqrt(obs.size))
        t, p = float("nan"), float("nan")
        # equal gaps reached along different float paths differ by ~1e-17: that is zero variance, no test
        # (scipy would report p ~ 0 for it)
        if sem <= 1e-10 * max(1.0, float(np.abs(obs).max())):
            sem = 0.0
        else:
            res = _st.ttest_1samp(obs, 0.0)
            t, p = float(res.statistic), float(res.pvalue)
    else:
        sem, t, p = float("nan"), float("nan"), float("nan")
        test = "none (fewer than 2 paired observations)"
    ci_low, ci_high = float("nan"), float("nan")
    if n_seeds:
        ci_low, ci_high = _bootstrap_ci(mon[:, both], unm[:, both], n_boot, seed, level)
    return {
        "compliance_monitored": comp_mon,
        "compliance_unmonitored": comp_unm,
        "gap": gap,
        "gap_sem": sem,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "t": t,
        "p": p,
        "test": test,
        "n_questions": len(questions),
        "n_seeds": n_seeds,
        "n_rows": n_rows,
        "n_unjudged": n_unjudged,
    }


def _groups(df: pd.DataFrame, by: Sequence[str]):
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: not columns of the frame (have {list(df.columns)})")
    if not by:
        yield (), df
        return
    yield from df.groupby(list(by), sort=True, dropna=False)


def gap_table(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """`gap_stats` per group of `by` (default: varying context columns + driver, layer, coefficient)."""
    by = default_by(df) if by is None else list(by)
    _check(df)
    records = []
    for key, sub in _groups(df, by):
        record = dict(zip(by, key))
        record.update(gap_stats(sub, n_boot=n_boot, seed=seed, level=level))
        records.append(record)
    return pd.DataFrame(records, columns=[*by, *GAP_FIELDS])


def compliance_by_condition(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean compliance per group and condition (mean over seeds of per-seed means) with SEM over seeds.

    Long form: columns `by` + condition, compliance, sem, n_seeds, n_rows, n_unjudged.
    """
    by = default_by(df) if by is None else list(by)
    _check(df)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: not columns of the frame (have {list(df.columns)})")
    keys = [*by, "condition"]
    cols = [*keys, "compliance", "sem", "n_seeds", "n_rows", "n_unjudged"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    grouped = df.groupby(keys, sort=True, dropna=False)
    unjudged = df["compliance"].isna().groupby([df[k] for k in keys], sort=True, dropna=False).sum()
    counts = pd.DataFrame({"n_rows": grouped.size(), "n_unjudged": unjudged})
    seed_means = df.groupby([*keys, "seed"], sort=True, dropna=False)["compliance"].mean().dropna()
    over_seeds = seed_means.groupby(level=list(range(len(keys))), dropna=False).agg(["mean", "std", "count"])
    out = counts.join(over_seeds, how="left")
    out["count"] = out["count"].fillna(0).astype(int)
    out["sem"] = np.where(out["count"] >= 2, out["std"] / np.sqrt(out["count"].clip(lower=1)), np.nan)
    out = out.rename(columns={"mean": "compliance", "count": "n_seeds"}).reset_index()
    out["n_rows"] = out["n_rows"].astype(int)
    out["n_unjudged"] = out["n_unjudged"].astype(int)
    return out[cols]
