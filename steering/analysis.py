"""Compare drivers and layers on sweep results: gap curves, steerability slopes, random-control bands, and a
logistic decomposition of compliance into condition x driver-coefficient effects.

Conventions: driver "none" (coefficient 0, no layer: `steering.baseline`) is the unsteered baseline; drivers whose
name starts with "random" are random-direction controls. Where a steered (driver, layer) has no coefficient-0 rows,
the baseline rows stand in for its coefficient 0 (`attach_baseline`), so every curve starts from the same point.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import special as _sp
from scipy import stats as _st

from steering.baseline import BASELINE_DRIVER, zero_rows
from steering.stats import CONTEXT_COLUMNS, context_columns, gap_table, unit_gaps

CONTROL_PREFIX = "random"
POOLED_CONTROLS = "controls"
"""Name of the single decomposition term that pools all random-control drivers."""


def is_control(name: object) -> bool:
    """True for random-direction control drivers ("random", "random-0", "random-1", ...)."""
    return str(name).startswith(CONTROL_PREFIX)


def _need(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"results frame lacks column(s) {missing}; pass rows as returned by ResultStore.frame()")


def _ctx_of(frame: pd.DataFrame) -> list[str]:
    """Context columns of a derived table (they are present only when they varied in the rows)."""
    return [c for c in CONTEXT_COLUMNS if c in frame.columns]


def _steered(df: pd.DataFrame) -> pd.Series:
    return df["driver"] != BASELINE_DRIVER


def attach_baseline(df: pd.DataFrame) -> pd.DataFrame:
    """Copy baseline ("none") rows in as coefficient 0 of every steered (driver, layer) that lacks one.

    Baseline rows are matched on run, model, variant and scorer (those present), so contexts never mix.
    """
    _need(df, ["driver", "layer", "coefficient"])
    base = df[~_steered(df)]
    if base.empty:
        return df
    match = [c for c in CONTEXT_COLUMNS if c in df.columns]
    cell = [*match, "driver", "layer"]
    steered = df[_steered(df)]
    has_zero = (steered["coefficient"] == 0).groupby([steered[c] for c in cell], dropna=False).any()
    lacking = has_zero[~has_zero].reset_index()[cell]
    if lacking.empty:
        return df
    return pd.concat([df, zero_rows(df, lacking, match)], ignore_index=True)


def gap_curves(df: pd.DataFrame, *, baseline: bool = True, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Gap with SEM, bootstrap CI and t-test per (varying context) x driver x layer x coefficient."""
    _need(df, ["driver", "layer", "coefficient"])
    rows = attach_baseline(df) if baseline else df
    by = [*context_columns(df), "driver", "layer", "coefficient"]
    curves = gap_table(rows, by=by, n_boot=n_boot, seed=seed)
    curves.insert(len(by), "is_control", curves["driver"].map(is_control).astype(bool))
    return curves.sort_values(by, kind="stable").reset_index(drop=True)


def steerability(df: pd.DataFrame, *, baseline: bool = True, unit: str = "auto") -> pd.DataFrame:
    """Per driver x layer: OLS slope of gap vs coefficient (95% CI) and Spearman rank correlation.

    Observations are per-seed gaps at each coefficient (per-question gaps when the data have a single seed,
    or with unit="question"); they are treated as independent, so the CI ignores pairing across coefficients.
    """
    _need(df, ["driver", "layer", "coefficient", "seed"])
    if unit == "auto":
        unit = "seed" if df.loc[df["compliance"].notna(), "seed"].nunique() >= 2 else "question"
    rows = attach_baseline(df) if baseline else df
    ctx = context_columns(df)
    records = []
    for key, sub in rows[_steered(rows)].groupby([*ctx, "driver", "layer"], sort=True, dropna=False):
        xs, ys = [], []
        for coef, cell in sub.groupby("coefficient", sort=True):
            gaps, _ = unit_gaps(cell, unit)
            xs.append(np.full(gaps.size, float(coef)))
            ys.append(gaps.to_numpy(dtype=float))
        x = np.concatenate(xs) if xs else np.empty(0)
        y = np.concatenate(ys) if ys else np.empty(0)
        rec: dict[str, Any] = dict(zip([*ctx, "driver", "layer"], key))
        rec.update(_slope(x, y))
        rec.update({"is_control": is_control(rec["driver"]), "unit": unit, "n_coefficients": len(xs)})
        records.append(rec)
    cols = [*ctx, "driver", "layer", "is_control", "unit", "n_coefficients", "n_obs", "slope", "slope_se"]
    cols += ["slope_ci_low", "slope_ci_high", "slope_p", "intercept", "spearman_rho", "spearman_p"]
    return pd.DataFrame(records, columns=cols)


def _slope(x: np.ndarray, y: np.ndarray, level: float = 0.95) -> dict[str, float]:
    nan = float("nan")
    out = dict.fromkeys(
        [
            "slope",
            "slope_se",
            "slope_ci_low",
            "slope_ci_high",
            "slope_p",
            "intercept",
            "spearman_rho",
            "spearman_p",
        ],
        nan,
    )
    out["n_obs"] = int(x.size)
    if x.size < 3 or np.unique(x).size < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant y: correlation undefined
        fit = _st.linregress(x, y)
        rho, rho_p = _st.spearmanr(x, y)
    half = _st.t.ppf(0.5 + level / 2, x.size - 2) * fit.stderr
    out.update(
        slope=float(fit.slope),
        slope_se=float(fit.stderr),
        slope_ci_low=float(fit.slope - half),
        slope_ci_high=float(fit.slope + half),
        slope_p=float(fit.pvalue),
        intercept=float(fit.intercept),
        spearman_rho=float(rho),
        spearman_p=float(rho_p),
    )
    return out


MIN_CONTROLS = 3
"""Fewest random-control drivers a band test needs: with one control the band is a line and with two its spread is
one difference, so a driver could not be told apart from the controls' own scatter; below this the comparison is
reported as not testable."""


def control_band(
    df: pd.DataFrame | None = None, *, curves: pd.DataFrame | None = None, baseline: bool = True
) -> pd.DataFrame:
    """Per layer x coefficient: min, max, mean and SD (ddof 1) of the gap over the random-control drivers."""
    curves = _curves(df, curves, baseline)
    ctx = _ctx_of(curves)
    ctrl = curves[curves["is_control"] & curves["gap"].notna()]
    cols = [*ctx, "layer", "coefficient", "band_low", "band_high", "band_mean", "band_sd", "n_controls"]
    if ctrl.empty:
        return pd.DataFrame(columns=cols)
    band = (
        ctrl.groupby([*ctx, "layer", "coefficient"], sort=True, dropna=False)["gap"]
        .agg(band_low="min", band_high="max", band_mean="mean", band_sd="std", n_controls="count")
        .reset_index()
    )
    return band[cols]


def _curves(df: pd.DataFrame | None, curves: pd.DataFrame | None, baseline: bool) -> pd.DataFrame:
    if curves is not None:
        return curves
    if df is None:
        raise ValueError("pass the results rows (df) or precomputed gap_curves(df) (curves=...)")
    return gap_curves(df, baseline=baseline)


def _point_se(sub: pd.DataFrame, level: float = 0.95) -> np.ndarray:
    """Each point's standard error: from its CI (half-width / z), else its SEM, else 0."""
    z = _st.norm.ppf(0.5 + level / 2)
    from_ci = (sub["ci_high"].to_numpy(dtype=float) - sub["ci_low"].to_numpy(dtype=float)) / (2 * z)
    sem = sub["gap_sem"].to_numpy(dtype=float) if "gap_sem" in sub.columns else np.full(len(sub), np.nan)
    return np.where(np.isfinite(from_ci), from_ci, np.where(np.isfinite(sem), sem, 0.0))


def outside_control_band(
    df: pd.DataFrame | None = None,
    *,
    curves: pd.DataFrame | None = None,
    baseline: bool = True,
    min_controls: int = MIN_CONTROLS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per non-control driver x layer: does its gap leave the random-control band, given the band's spread and
    the point's own uncertainty?

    At each coefficient, with n controls of mean m and SD s and the driver's gap g with standard error se (from
    its CI), the driver is outside when |g - m| > t(1 - alpha' / 2, n - 1) * sqrt(s^2 (1 + 1/n) + se^2): outside
    the prediction interval of one more random direction, widened by the point's CI. alpha' = alpha / k
    (Bonferroni over the k coefficients compared). With fewer than `min_controls` controls (default
    MIN_CONTROLS = 3) nothing is tested: `testable` is False, `outside` is NA and `verdict` says
    "not testable (n controls)". `p_min` is the smallest (uncorrected) two-sided p over the coefficients.

    Also reported: `coefficients_ci_outside`, where the whole CI lies beyond the band's min..max, and
    `max_excess`, the largest distance of the gap beyond min..max (0 when inside).
    """
    if min_controls < 2:
        raise ValueError(f"min_controls={min_controls}: a band test needs at least 2 controls for a spread")
    curves = _curves(df, curves, baseline)
    ctx = _ctx_of(curves)
    band = control_band(curves=curves)
    drivers = curves[~curves["is_control"] & (curves["driver"] != BASELINE_DRIVER)]
    merged = drivers.merge(band, on=[*ctx, "layer", "coefficient"], how="left")
    records = []
    for key, sub in merged.groupby([*ctx, "driver", "layer"], sort=True, dropna=False):
        sub = sub[sub["band_low"].notna() & sub["gap"].notna()]
        rec = dict(zip([*ctx, "driver", "layer"], key))
        n_controls = int(sub["n_controls"].min()) if len(sub) else 0
        testable = len(sub) > 0 and n_controls >= min_controls
        ci_out = (sub["ci_low"] > sub["band_high"]) | (sub["ci_high"] < sub["band_low"])
        excess = np.maximum(sub["gap"] - sub["band_high"], sub["band_low"] - sub["gap"]).clip(lower=0)
        rec.update(n_compared=int(len(sub)), n_controls=n_controls, testable=bool(testable))
        if testable:
            n = sub["n_controls"].to_numpy(dtype=float)
            spread = np.sqrt(sub["band_sd"].to_numpy(dtype=float) ** 2 * (1 + 1 / n) + _point_se(sub) ** 2)
            distance = (sub["gap"] - sub["band_mean"]).to_numpy(dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(spread > 0, np.abs(distance) / spread, np.where(distance != 0, np.inf, 0.0))
            p = 2 * _st.t.sf(t, n - 1)
            out = p < alpha / len(sub)
            above, below = out & (distance > 0), out & (distance < 0)
            rec.update(
                outside=bool(out.any()),
                verdict="outside" if out.any() else "inside",
                p_min=float(p.min()),
                n_above=int(above.sum()),
                n_below=int(below.sum()),
                coefficients_outside=[float(c) for c in sub.loc[out, "coefficient"]],
            )
        else:
            rec.update(
                outside=pd.NA,
                verdict=f"not testable ({n_controls} control{'s' if n_controls != 1 else ''})",
                p_min=float("nan"),
                n_above=0,
                n_below=0,
                coefficients_outside=[],
            )
        rec.update(
            coefficients_ci_outside=[float(c) for c in sub.loc[ci_out, "coefficient"]],
            max_excess=float(excess.max()) if len(sub) else float("nan"),
        )
        records.append(rec)
    cols = [*ctx, "driver", "layer", "n_compared", "n_controls", "testable", "outside", "verdict", "p_min"]
    cols += ["n_above", "n_below", "coefficients_outside", "coefficients_ci_outside", "max_excess"]
    return pd.DataFrame(records, columns=cols)


def layer_table(
    df: pd.DataFrame | None,
    driver: str,
    value: str = "gap",
    *,
    curves: pd.DataFrame | None = None,
    baseline: bool = True,
) -> pd.DataFrame:
    """Layer x coefficient pivot of `value` (a gap_curves column, default the gap) for one driver."""
    curves = _curves(df, curves, baseline)
    if value not in curves.columns:
        raise ValueError(f"value {value!r} is not a gap_curves column; choose one of {list(curves.columns)}")
    sub = curves[curves["driver"] == driver]
    if sub.empty:
        raise ValueError(f"driver {driver!r} not in the results; drivers present: {sorted(curves['driver'].unique())}")
    return sub.pivot_table(index=[*_ctx_of(curves), "layer"], columns="coefficient", values=value, aggfunc="first")


# -- logistic decomposition ----------------------------------------------------------------------------------


def decompose(
    df: pd.DataFrame,
    *,
    per_layer: bool = True,
    controls: str = "pooled",
    cluster: str | None = "question",
    level: float = 0.95,
) -> pd.DataFrame:
    """Fractional-logit decomposition of compliance, fitted by maximum likelihood (Newton / IRLS):

        logit P(comply) = b0 + b_mon * monitored + sum_d beta_d * coef_d + sum_d gamma_d * monitored * coef_d

    coef_d is the row's coefficient when its driver is d (else 0); d is "driver@L<layer>" with per_layer,
    else the driver pooled over layers. gamma_d says how driver d moves the gap (logit units per unit
    coefficient). Random controls are pooled into one term "controls" (a null reference: its gamma should
    be ~0) or dropped with controls="exclude". Compliance values are used as probabilities (quasi-likelihood);
    SEs are sandwich estimates clustered by `cluster` (default question; None for HC1). Unjudged rows are
    dropped. Several contexts (variants, models, ...) are fitted separately.
    """
    _need(df, ["driver", "layer", "coefficient", "condition", "compliance"])
    if controls not in ("pooled", "exclude"):
        raise ValueError(f"controls must be 'pooled' or 'exclude', got {controls!r}")
    if cluster is not None:
        _need(df, [cluster])
    ctx = context_columns(df)
    parts = []
    groups = df.groupby(ctx, sort=True, dropna=False) if ctx else [((), df)]
    for key, sub in groups:
        table = _decompose_one(sub, per_layer, controls, cluster, level)
        for col, val in zip(ctx, key if isinstance(key, tuple) else (key,)):
            table.insert(ctx.index(col), col, val)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def _term_name(driver: str, layer: int, per_layer: bool) -> str:
    name = POOLED_CONTROLS if is_control(driver) else driver
    return f"{name}@L{layer}" if per_layer else name


def _decompose_one(df: pd.DataFrame, per_layer: bool, controls: str, cluster: str | None, level: float) -> pd.DataFrame:
    rows = df[df["compliance"].notna()]
    if controls == "exclude":
        rows = rows[~rows["driver"].map(is_control).astype(bool)]
    if rows.empty:
        raise ValueError("no judged rows to decompose; score the results first (compliance is NULL everywhere)")
    y = rows["compliance"].to_numpy(dtype=float)
    mon = (rows["condition"] == "monitored").to_numpy(dtype=float)
    coef = rows["coefficient"].to_numpy(dtype=float)
    steered = (rows["driver"] != BASELINE_DRIVER).to_numpy() & (coef != 0)
    cells = rows[["driver", "layer"]].drop_duplicates()
    cells = cells.assign(term=[_term_name(d, int(lay), per_layer) for d, lay in zip(cells["driver"], cells["layer"])])
    names = rows[["driver", "layer"]].merge(cells, on=["driver", "layer"], how="left")["term"].to_numpy(dtype=object)
    terms = sorted({n for n, s in zip(names, steered) if s})

    columns = [np.ones_like(y), mon]
    meta: list[tuple[str, str, str | None, int | None]] = [
        ("intercept", "intercept", None, None),
        ("monitored", "condition", None, None),
    ]
    for term in terms:
        x = np.where(steered & (names == term), coef, 0.0)
        drv, _, lay = term.partition("@L")
        layer = int(lay) if lay else None
        columns += [x, mon * x]
        meta += [
            (f"coef[{term}]", "coefficient", drv, layer),
            (f"monitored:coef[{term}]", "interaction", drv, layer),
        ]
    X = np.column_stack(columns)
    if np.unique(mon).size < 2:
        raise ValueError("decomposition needs both monitored and unmonitored rows")
    groups = None if cluster is None else pd.factorize(rows[cluster])[0]
    beta, cov, converged = fit_fractional_logit(X, y, groups)
    if not converged:
        warnings.warn("decomposition did not converge (separation?); estimates may be unreliable", stacklevel=3)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = beta / se
    crit = _st.norm.ppf(0.5 + level / 2)
    out = pd.DataFrame(meta, columns=["term", "kind", "driver", "layer"])
    out["layer"] = out["layer"].astype("Int64")
    out["estimate"] = beta
    out["se"] = se
    out["z"] = z
    out["p"] = 2 * _st.norm.sf(np.abs(z))
    out["ci_low"] = beta - crit * se
    out["ci_high"] = beta + crit * se
    out["n_obs"] = int(y.size)
    out["n_clusters"] = int(np.unique(groups).size) if groups is not None else int(y.size)
    out["converged"] = converged
    return out


def fit_fractional_logit(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Maximise sum y*log(p) + (1-y)*log(1-p), p = expit(X b), by damped Newton: (b, sandwich cov, converged).

    y may be fractional in [0, 1]. The covariance is cluster-robust over `groups` (integer labels), or HC1.
    Small-sample factors: G/(G-1) on the clustered meat (Stata's convention for ML models), n/(n-k) for HC1.

    Checked against statsmodels (tests/test_analysis.py): GLM(Binomial) gives the same coefficients (|diff| <
    1e-14) and, with cov_type="cluster", SEs larger by exactly sqrt((N-1)/(N-K)) (its default also applies the OLS
    factor (N-1)/(N-K)), equal to ~1e-13 once that factor is removed. Kept here rather than adding statsmodels as a
    runtime dependency.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    n, k = X.shape
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    Xs = X / scale  # columns on a common scale: coefficients in the hundreds stay well conditioned
    # einsum rather than BLAS (@): small-k products on many rows thrash BLAS threads on a busy machine
    gram_eig = np.linalg.eigvalsh(np.einsum("ni,nj->ij", Xs, Xs))
    if gram_eig.min() <= 1e-10 * max(gram_eig.max(), 1e-300):
        raise ValueError(
            "decomposition terms are collinear (e.g. a driver seen in only one condition, or at a single "
            "coefficient); add rows that vary them, or use per_layer=False / controls='exclude'"
        )

    def linear(b: np.ndarray) -> np.ndarray:
        return np.einsum("nk,k->n", Xs, b)

    def loglik(b: np.ndarray) -> float:
        eta = linear(b)
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    beta = np.zeros(k)
    mean = np.clip(y.mean(), 1e-6, 1 - 1e-6)
    if np.allclose(Xs[:, 0], 1.0):
        beta[0] = np.log(mean / (1 - mean))
    ll = loglik(beta)
    converged = False
    for _ in range(max_iter):
        p = _sp.expit(linear(beta))
        grad = np.einsum("nk,n->k", Xs, y - p)
        hess = np.einsum("ni,nj->ij", Xs * (p * (1 - p))[:, None], Xs)
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while t > 1e-10:
            new_ll = loglik(beta + t * step)
            if new_ll >= ll - 1e-12 * abs(ll):
                break
            t /= 2
        beta = beta + t * step
        ll = new_ll
        if np.max(np.abs(t * step)) < tol:
            converged = True
            break

    p = _sp.expit(linear(beta))
    bread = np.linalg.pinv(np.einsum("ni,nj->ij", Xs * (p * (1 - p))[:, None], Xs))
    scores = Xs * (y - p)[:, None]
    if groups is None:
        meat = np.einsum("ni,nj->ij", scores, scores) * (n / max(n - k, 1))
    else:
        labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
        g = labels.size
        summed = np.column_stack([np.bincount(inverse, weights=scores[:, j], minlength=g) for j in range(k)])
        meat = np.einsum("gi,gj->ij", summed, summed) * (g / max(g - 1, 1))
    cov_s = bread @ meat @ bread
    return beta / scale, cov_s / np.outer(scale, scale), converged
