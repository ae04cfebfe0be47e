"""Tests for steering.stats: gap values, SEM over seeds, paired bootstrap CI, t-tests, unjudged rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from steering.stats import (
    compliance_by_condition,
    default_by,
    gap_stats,
    gap_table,
    per_question_gaps,
    per_seed_gaps,
    unit_gaps,
)


def frame(values: dict[tuple[str, str, int], float], **cols) -> pd.DataFrame:
    """Rows from {(condition, question, seed): compliance}."""
    rows = [{"condition": c, "question": q, "seed": s, "compliance": v, **cols} for (c, q, s), v in values.items()]
    return pd.DataFrame(rows)


def synthetic(n_q=50, seeds=(0, 1, 2), gap=0.2, rng_seed=1, **cols) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    base = rng.uniform(0.1, 0.6, n_q)
    rows = []
    for s in seeds:
        for q in range(n_q):
            noise = rng.normal(0, 0.05, 2)
            rows.append({"condition": "unmonitored", "question": f"q{q}", "seed": s, "compliance": base[q], **cols})
            m = float(np.clip(base[q] + gap + noise[0], 0, 1))
            rows.append({"condition": "monitored", "question": f"q{q}", "seed": s, "compliance": m, **cols})
    return pd.DataFrame(rows)


# seed 0: monitored (1.0, 0.5), unmonitored (0.0, 0.5) -> gap 0.5; seed 1: (1.0, 1.0) vs (0.5, 0.5) -> gap 0.5
# seed 2: (0.8, 0.6) vs (0.4, 0.6) -> gap 0.2
HAND = {
    ("monitored", "a", 0): 1.0,
    ("monitored", "b", 0): 0.5,
    ("unmonitored", "a", 0): 0.0,
    ("unmonitored", "b", 0): 0.5,
    ("monitored", "a", 1): 1.0,
    ("monitored", "b", 1): 1.0,
    ("unmonitored", "a", 1): 0.5,
    ("unmonitored", "b", 1): 0.5,
    ("monitored", "a", 2): 0.8,
    ("monitored", "b", 2): 0.6,
    ("unmonitored", "a", 2): 0.4,
    ("unmonitored", "b", 2): 0.6,
}


def test_gap_values_by_hand():
    out = gap_stats(frame(HAND), n_boot=500)
    seed_gaps = np.array([0.5, 0.5, 0.2])
    assert out["gap"] == pytest.approx(0.4)
    assert out["compliance_monitored"] == pytest.approx((0.75 + 1.0 + 0.7) / 3)
    assert out["compliance_unmonitored"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert out["gap_sem"] == pytest.approx(seed_gaps.std(ddof=1) / np.sqrt(3))
    ref = st.ttest_1samp(seed_gaps, 0.0)
    assert out["t"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    assert "per-seed" in out["test"]
    assert (out["n_questions"], out["n_seeds"], out["n_rows"], out["n_unjudged"]) == (2, 3, 12, 0)
    assert per_seed_gaps(frame(HAND)).to_dict() == pytest.approx({0: 0.5, 1: 0.5, 2: 0.2})
    # question a: (1-0, 1-.5, .8-.4) -> 0.6333; question b: (0, 0.5, 0) -> 0.1667
    assert per_question_gaps(frame(HAND)).to_dict() == pytest.approx({"a": 1.9 / 3, "b": 0.5 / 3})


def test_unjudged_rows_excluded_and_counted():
    values = dict(HAND)
    df = frame(values)
    extra = pd.DataFrame(
        [
            {"condition": "monitored", "question": "a", "seed": 0, "compliance": np.nan},
            {"condition": "unmonitored", "question": "c", "seed": 1, "compliance": None},
        ]
    )
    out = gap_stats(pd.concat([df, extra], ignore_index=True), n_boot=200)
    assert out["gap"] == pytest.approx(0.4)
    assert out["n_unjudged"] == 2 and out["n_rows"] == 14 and out["n_questions"] == 2


def test_single_seed_uses_question_gaps():
    df = synthetic(n_q=30, seeds=(7,), gap=0.2)
    out = gap_stats(df, n_boot=300)
    q = per_question_gaps(df).to_numpy()
    assert "per-question" in out["test"] and "single seed" in out["test"]
    assert out["t"] == pytest.approx(st.ttest_1samp(q, 0.0).statistic)
    assert out["gap_sem"] == pytest.approx(q.std(ddof=1) / np.sqrt(q.size))
    assert out["n_seeds"] == 1
    assert unit_gaps(df)[1] == "question" and unit_gaps(synthetic())[1] == "seed"


def test_bootstrap_is_paired_over_questions():
    # questions differ a lot, but every question has exactly the same gap: a paired CI must be degenerate
    rows = {}
    for q, base in enumerate(np.linspace(0.0, 0.7, 20)):
        for s in (0, 1):
            rows[("unmonitored", f"q{q}", s)] = base
            rows[("monitored", f"q{q}", s)] = base + 0.3
    out = gap_stats(frame(rows), n_boot=1000)
    assert out["gap"] == pytest.approx(0.3)
    assert out["ci_low"] == pytest.approx(0.3) and out["ci_high"] == pytest.approx(0.3)


def test_bootstrap_ci_covers_truth_and_is_reproducible():
    df = synthetic(n_q=80, gap=0.2)
    a, b = gap_stats(df, seed=3), gap_stats(df, seed=3)
    assert a["ci_low"] == b["ci_low"] and a["ci_high"] == b["ci_high"]
    assert a["ci_low"] < a["gap"] < a["ci_high"]
    assert a["ci_low"] < 0.2 < a["ci_high"]
    assert 0.0 < a["ci_high"] - a["ci_low"] < 0.05
    assert a["p"] < 0.001
    null = gap_stats(synthetic(n_q=80, gap=0.0, rng_seed=5))
    assert null["ci_low"] < 0.0 < null["ci_high"]
    assert gap_stats(df, n_boot=0)["ci_low"] != gap_stats(df, n_boot=0)["ci_low"]  # NaN when no bootstrap


def test_missing_condition_gives_nan_gap():
    df = frame({k: v for k, v in HAND.items() if k[0] == "monitored"})
    out = gap_stats(df, n_boot=100)
    assert np.isnan(out["gap"]) and np.isnan(out["compliance_unmonitored"])
    assert out["compliance_monitored"] == pytest.approx((0.75 + 1.0 + 0.7) / 3)
    assert out["n_seeds"] == 0 and "none" in out["test"]


def test_gap_table_groups_and_default_by():
    parts = []
    for drv, layer, coef, gap in [
        ("values", 3, 0.0, 0.1),
        ("values", 3, 4.0, 0.3),
        ("random-0", 3, 4.0, 0.1),
    ]:
        parts.append(synthetic(n_q=20, gap=gap, driver=drv, layer=layer, coefficient=coef, variant="base"))
    df = pd.concat(parts, ignore_index=True)
    assert default_by(df) == ["driver", "layer", "coefficient"]
    table = gap_table(df, n_boot=200)
    assert len(table) == 3
    row = table[(table.driver == "values") & (table.coefficient == 4.0)].iloc[0]
    sub = df[(df.driver == "values") & (df.coefficient == 4.0)]
    assert row["gap"] == pytest.approx(gap_stats(sub, n_boot=200)["gap"])
    assert row["gap"] == pytest.approx(0.3, abs=0.03)
    df2 = pd.concat([df, df.assign(variant="informative")], ignore_index=True)
    assert default_by(df2) == ["variant", "driver", "layer", "coefficient"]
    assert len(gap_table(df2, n_boot=0)) == 6
    whole = gap_table(df, by=[], n_boot=0)
    assert len(whole) == 1 and whole.loc[0, "n_rows"] == len(df)


def test_compliance_by_condition():
    df = frame(HAND, driver="values")
    out = compliance_by_condition(df, by=["driver"]).set_index("condition")
    assert out.loc["monitored", "compliance"] == pytest.approx((0.75 + 1.0 + 0.7) / 3)
    assert out.loc["unmonitored", "compliance"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert out.loc["monitored", "sem"] == pytest.approx(np.std([0.75, 1.0, 0.7], ddof=1) / np.sqrt(3))
    assert out.loc["monitored", "n_rows"] == 6


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.assign(condition="paid"), "condition values"),
        (lambda d: d.assign(compliance=2.0), r"\[0, 1\]"),
        (lambda d: d.drop(columns="seed"), "seed"),
    ],
)
def test_validation(mutate, match):
    with pytest.raises(ValueError, match=match):
        gap_stats(mutate(frame(HAND)))
    with pytest.raises(ValueError, match="not columns"):
        gap_table(frame(HAND), by=["layer"])


def test_identical_seed_gaps_give_zero_sem_not_tiny_p():
    # per-seed gaps 0.2 and 0.2 reached through different float sums: no spurious significance
    values = {("monitored", "a", 0): 0.7, ("monitored", "b", 0): 0.7, ("unmonitored", "a", 0): 0.5}
    values |= {("unmonitored", "b", 0): 0.5, ("monitored", "a", 1): 0.9, ("monitored", "b", 1): 0.5}
    values |= {("unmonitored", "a", 1): 0.6, ("unmonitored", "b", 1): 0.4}
    out = gap_stats(frame(values), n_boot=0)
    assert out["gap"] == pytest.approx(0.2)
    assert out["gap_sem"] == 0.0
    assert np.isnan(out["p"])
