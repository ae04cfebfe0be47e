"""Tests for steering.analysis: baseline attachment, curves, slopes, control bands, logistic decomposition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from simulate import simulate_rows

from steering.analysis import (
    attach_baseline,
    control_band,
    decompose,
    fit_fractional_logit,
    gap_curves,
    is_control,
    layer_table,
    outside_control_band,
    steerability,
)

PLANTED = {"values": (0.03, 0.08), "goal_guarding": (-0.02, 0.0), "sycophancy": (0.0, -0.05)}


def test_is_control():
    assert is_control("random") and is_control("random-0") and is_control("random-12")
    assert not is_control("values") and not is_control("none") and not is_control("my_random")


def test_attach_baseline_fills_coefficient_zero_only_where_missing():
    df = simulate_rows({"values": (0, 0)}, layers=(3, 5), coefficients=(4.0,), n_controls=1, n_questions=3, seeds=(0,))
    out = attach_baseline(df)
    base = df[df.driver == "none"]
    zeros = out[(out.driver != "none") & (out.coefficient == 0)]
    assert len(zeros) == len(base) * 4  # (values, random-0) x (layer 3, 5)
    assert set(zeros.layer) == {3, 5}
    assert zeros["compliance"].sum() == pytest.approx(base["compliance"].sum() * 4)
    # a (driver, layer) with its own coefficient-0 rows is left alone
    own = df[df.driver == "values"].assign(coefficient=0.0, compliance=1.0)
    out2 = attach_baseline(pd.concat([df, own], ignore_index=True))
    assert (out2[(out2.driver == "values") & (out2.coefficient == 0)]["compliance"] == 1.0).all()


def test_gap_curves_follow_planted_gap():
    df = simulate_rows({"values": (0.0, 0.1)}, coefficients=(5.0, 10.0), n_controls=0, outcome="probability")
    curves = gap_curves(df, n_boot=100)
    assert set(curves.columns) >= {"driver", "layer", "coefficient", "is_control", "gap", "ci_low", "ci_high"}
    gap = curves.set_index(["driver", "coefficient"])["gap"]
    for coef in (0.0, 5.0, 10.0):
        expected = expit(-0.5 + 1.0 + coef * 0.1) - expit(-0.5)
        assert gap[("values", coef)] == pytest.approx(expected, abs=1e-12)
    assert gap[("none", 0.0)] == pytest.approx(expit(0.5) - expit(-0.5))


def test_steerability_slope_and_rank():
    drivers = {"up": (0.0, 0.08), "flat": (0.0, 0.0)}
    df = simulate_rows(drivers, coefficients=(-8.0, -4.0, 4.0, 8.0), n_controls=0, n_questions=60, seeds=range(5))
    table = steerability(df).set_index("driver")
    up, flat = table.loc["up"], table.loc["flat"]
    assert up["unit"] == "seed" and up["n_obs"] == 25 and up["n_coefficients"] == 5
    coefs = np.array([-8.0, -4.0, 0.0, 4.0, 8.0])
    true_slope = np.polyfit(coefs, expit(0.5 + 0.08 * coefs) - expit(-0.5), 1)[0]
    assert up["slope_ci_low"] < true_slope < up["slope_ci_high"]
    assert up["slope_ci_low"] > 0 and up["spearman_rho"] > 0.6 and up["spearman_p"] < 1e-3
    assert flat["slope_ci_low"] < 0 < flat["slope_ci_high"]
    assert abs(flat["spearman_rho"]) < 0.5
    one_seed = steerability(df[df.seed == 0]).set_index("driver")
    assert one_seed.loc["up", "unit"] == "question" and one_seed.loc["up", "n_obs"] == 300


def test_slope_matches_hand_ols():
    df = simulate_rows({"d": (0.0, 0.05)}, coefficients=(2.0, 6.0), n_controls=0, n_questions=20, seeds=(0, 1, 2))
    table = steerability(df).iloc[0]
    from steering.stats import per_seed_gaps

    rows = attach_baseline(df)
    x, y = [], []
    for coef in (0.0, 2.0, 6.0):
        g = per_seed_gaps(rows[(rows.driver == "d") & (rows.coefficient == coef)])
        x += [coef] * len(g)
        y += list(g)
    slope, intercept = np.polyfit(x, y, 1)
    assert table["slope"] == pytest.approx(slope) and table["intercept"] == pytest.approx(intercept)


def test_control_band_and_outside():
    df = simulate_rows(
        {"values": (0.0, 0.15), "weak": (0.0, 0.0)},
        coefficients=(4.0, 16.0),
        n_controls=3,
        n_questions=60,
        outcome="probability",
        question_sd=0.5,
    )
    band = control_band(df).set_index("coefficient")
    assert (band["n_controls"] == 3).all()
    curves = gap_curves(df, n_boot=200)
    ctrl = curves[curves.is_control & (curves.coefficient == 16.0)]["gap"]
    assert band.loc[16.0, "band_low"] == pytest.approx(ctrl.min())
    assert band.loc[16.0, "band_high"] == pytest.approx(ctrl.max())
    assert band.loc[16.0, "band_mean"] == pytest.approx(ctrl.mean())
    out = outside_control_band(curves=curves).set_index("driver")
    assert bool(out.loc["values", "outside"]) is True
    assert out.loc["values", "coefficients_outside"] == [4.0, 16.0]
    assert 16.0 in out.loc["values", "coefficients_ci_outside"]
    assert out.loc["values", "max_excess"] > 0.2
    assert bool(out.loc["weak", "outside"]) is False and out.loc["weak", "max_excess"] == 0.0
    assert "none" not in out.index and not any(is_control(d) for d in out.index)


def test_layer_table_pivot():
    df = simulate_rows(
        {"values": (0.0, 0.1)},
        layers=(2, 6),
        layer_scale={2: 0.0, 6: 1.0},
        coefficients=(8.0,),
        n_controls=0,
        outcome="probability",
    )
    table = layer_table(df, "values")
    assert list(table.index) == [2, 6] and list(table.columns) == [0.0, 8.0]
    assert table.loc[2, 8.0] == pytest.approx(table.loc[2, 0.0])
    assert table.loc[6, 8.0] == pytest.approx(expit(0.5 + 0.8) - expit(-0.5))
    with pytest.raises(ValueError, match="drivers present"):
        layer_table(df, "nope")


def test_decompose_recovers_planted_exactly_on_probabilities():
    df = simulate_rows(
        PLANTED,
        layers=(7,),
        coefficients=(-4.0, 4.0, 8.0),
        outcome="probability",
        intercept=-0.3,
        monitored=0.9,
        n_questions=10,
        seeds=(0,),
    )
    table = decompose(df).set_index("term")
    assert table.loc["intercept", "estimate"] == pytest.approx(-0.3, abs=1e-6)
    assert table.loc["monitored", "estimate"] == pytest.approx(0.9, abs=1e-6)
    for drv, (beta, gamma) in PLANTED.items():
        assert table.loc[f"coef[{drv}@L7]", "estimate"] == pytest.approx(beta, abs=1e-6)
        assert table.loc[f"monitored:coef[{drv}@L7]", "estimate"] == pytest.approx(gamma, abs=1e-6)
    assert table.loc["monitored:coef[controls@L7]", "estimate"] == pytest.approx(0.0, abs=1e-6)
    assert table["converged"].all()
    assert set(table["kind"]) == {"intercept", "condition", "coefficient", "interaction"}


def test_decompose_bernoulli_within_confidence_intervals():
    df = simulate_rows(
        PLANTED,
        layers=(7,),
        coefficients=(-8.0, 8.0, 16.0),
        n_questions=80,
        seeds=(0, 1, 2),
        seed=11,
        unjudged=0.05,
    )
    table = decompose(df).set_index("term")
    truth = {"intercept": -0.5, "monitored": 1.0}
    for drv, (beta, gamma) in PLANTED.items():
        truth[f"coef[{drv}@L7]"] = beta
        truth[f"monitored:coef[{drv}@L7]"] = gamma
    for term, value in truth.items():
        row = table.loc[term]
        assert abs(row["estimate"] - value) < 3.5 * row["se"], term
        assert 0 < row["se"] < 0.2
    inter = table.loc["monitored:coef[values@L7]"]
    assert inter["ci_low"] > 0 and inter["p"] < 1e-3
    assert table["n_obs"].iloc[0] == int(df["compliance"].notna().sum())
    assert table["n_clusters"].iloc[0] == 80


def test_decompose_options():
    df = simulate_rows(
        {"values": (0.0, 0.1)},
        layers=(3, 9),
        coefficients=(4.0, 8.0),
        n_questions=10,
        seeds=(0,),
        outcome="probability",
    )
    pooled = decompose(df, per_layer=False)
    assert set(pooled.term) == {
        "intercept",
        "monitored",
        "coef[values]",
        "monitored:coef[values]",
        "coef[controls]",
        "monitored:coef[controls]",
    }
    excluded = decompose(df, controls="exclude", cluster=None)
    assert not excluded.term.str.contains("controls").any()
    assert {"coef[values@L3]", "coef[values@L9]"} <= set(excluded.term)
    both = decompose(pd.concat([df, df.assign(variant="informative")], ignore_index=True))
    assert list(both.columns[:1]) == ["variant"] and set(both.variant) == {"base", "informative"}
    with pytest.raises(ValueError, match="both monitored and unmonitored"):
        decompose(df[df.condition == "monitored"])
    with pytest.raises(ValueError, match="controls must be"):
        decompose(df, controls="keep")


def test_fit_handles_large_coefficient_scale():
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 100.0, 200.0, 400.0], 2000)
    m = rng.integers(0, 2, 2000).astype(float)
    X = np.column_stack([np.ones_like(x), m, x, m * x])
    b_true = np.array([-0.2, 0.8, 0.001, 0.004])
    beta, cov, ok = fit_fractional_logit(X, expit(X @ b_true))
    assert ok and np.allclose(beta, b_true, atol=1e-8)
    assert cov.shape == (4, 4) and np.all(np.diag(cov) >= 0)
    with pytest.raises(ValueError, match="collinear"):
        fit_fractional_logit(np.column_stack([X, 2 * x]), expit(X @ b_true))


def _curves(points: dict[str, tuple[float, float]], controls: list[float], coefficient: float = 4.0) -> pd.DataFrame:
    """A hand-made gap_curves table at one layer and coefficient: drivers (gap, CI half-width) and control gaps."""
    rows = [
        {"driver": d, "gap": g, "ci_low": g - h, "ci_high": g + h, "gap_sem": h / 1.96, "is_control": False}
        for d, (g, h) in points.items()
    ]
    rows += [
        {
            "driver": f"random-{i}",
            "gap": g,
            "ci_low": g - 0.01,
            "ci_high": g + 0.01,
            "gap_sem": 0.005,
            "is_control": True,
        }
        for i, g in enumerate(controls)
    ]
    return pd.DataFrame(rows).assign(layer=7, coefficient=coefficient)


def test_one_control_is_no_band():
    """One control, effects of 0.001 on a gap of 0.000 +- 0.001: this said `outside: yes` for every driver."""
    curves = _curves({"values": (0.001, 0.001), "sycophancy": (-0.001, 0.001)}, controls=[0.0])
    out = outside_control_band(curves=curves).set_index("driver")
    assert list(out["verdict"]) == ["not testable (1 control)"] * 2
    assert not out["testable"].any() and out["outside"].isna().all()
    assert out["coefficients_outside"].map(len).sum() == 0
    two = outside_control_band(curves=_curves({"values": (0.5, 0.01)}, controls=[0.0, 0.001])).iloc[0]
    assert (two["verdict"], two["testable"]) == ("not testable (2 controls)", False)
    df = simulate_rows({"values": (0.0, 0.0001)}, coefficients=(4.0,), n_controls=1, n_questions=8, seeds=(0,))
    assert outside_control_band(df)["verdict"].tolist() == ["not testable (1 control)"]


def test_band_test_weighs_the_controls_spread_and_the_points_ci():
    controls = [0.0, 0.02, -0.01, 0.01, 0.005]
    curves = _curves({"near": (0.03, 0.02), "far": (0.2, 0.02)}, controls)
    out = outside_control_band(curves=curves).set_index("driver")
    assert out["testable"].all() and (out["n_controls"] == 5).all()
    # "near" is above the band's max (0.02) but within the controls' scatter plus its own CI
    assert out.loc["near", "coefficients_ci_outside"] == [] and out.loc["near", "max_excess"] == pytest.approx(0.01)
    assert (out.loc["near", "verdict"], bool(out.loc["near", "outside"])) == ("inside", False)
    assert (out.loc["far", "verdict"], out.loc["far", "coefficients_outside"]) == ("outside", [4.0])
    assert out.loc["far", "n_above"] == 1 and out.loc["far", "n_below"] == 0
    m, s, n = np.mean(controls), np.std(controls, ddof=1), len(controls)
    spread = np.sqrt(s**2 * (1 + 1 / n) + (0.02 / 1.959963984540054) ** 2)
    from scipy import stats

    assert out.loc["near", "p_min"] == pytest.approx(2 * stats.t.sf(abs(0.03 - m) / spread, n - 1), rel=1e-6)
    assert out.loc["near", "p_min"] > 0.05 > out.loc["far", "p_min"]
    band = control_band(curves=curves).iloc[0]
    assert band["band_sd"] == pytest.approx(s) and band["band_mean"] == pytest.approx(m)


@pytest.mark.parametrize("outcome", ["bernoulli", "probability"])
def test_fractional_logit_matches_statsmodels_glm(outcome):
    """statsmodels is the reference: GLM(Binomial) with question-clustered (and heteroskedasticity-robust) SEs.

    Coefficients agree to solver precision. SEs agree once the small-sample factors are lined up: ours scale the
    clustered meat by G/(G-1) (Stata's convention for ML models), statsmodels' default by G/(G-1) * (N-1)/(N-K);
    our unclustered SEs are HC1 (n/(n-k)), statsmodels' GLM 'HC1' applies no factor (= HC0).
    """
    import warnings

    import statsmodels.api as sm

    drivers = {"values": (0.03, 0.08), "goal_guarding": (-0.02, 0.0), "sycophancy": (0.0, -0.05)}
    df = simulate_rows(
        drivers,
        layers=(7,),
        coefficients=(-8.0, 8.0, 16.0),
        n_questions=60,
        seeds=(0, 1),
        seed=11,
        question_sd=0.7,
        outcome=outcome,
        unjudged=0.05,
    )
    df = df[df["compliance"].notna()]
    mon = (df["condition"] == "monitored").to_numpy(dtype=float)
    columns = [np.ones(len(df)), mon]
    for name in drivers:
        x = np.where(df["driver"] == name, df["coefficient"], 0.0)
        columns += [x, mon * x]
    X, y = np.column_stack(columns), df["compliance"].to_numpy(dtype=float)
    groups = pd.factorize(df["question"])[0]
    n, k = X.shape

    beta, cov, converged = fit_fractional_logit(X, y, groups)
    _, cov_hc, _ = fit_fractional_logit(X, y, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fractional y in a Binomial GLM
        model = sm.GLM(y, X, family=sm.families.Binomial())
        clustered = model.fit(cov_type="cluster", cov_kwds={"groups": groups}, tol=1e-12)
        hc0 = model.fit(cov_type="HC0", tol=1e-12)
    assert converged
    np.testing.assert_allclose(beta, clustered.params, rtol=0, atol=1e-9)
    se = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(se, clustered.bse * np.sqrt((n - k) / (n - 1)), rtol=1e-8)
    assert np.abs(se / clustered.bse - 1).max() < 1e-3  # even unadjusted: within 0.1%
    np.testing.assert_allclose(np.sqrt(np.diag(cov_hc)), hc0.bse * np.sqrt(n / (n - k)), rtol=1e-8)
