"""Tests for steering.report: files written, one plotted series per driver / control, tables in report.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from simulate import simulate_rows

from steering.analysis import control_band, gap_curves
from steering.report import (
    markdown_table,
    plot_compliance_by_condition,
    plot_gap_vs_coefficient,
    plot_heatmap,
    write_report,
)

DRIVERS = {"values": (0.02, 0.08), "goal_guarding": (0.0, 0.04), "sycophancy": (0.0, -0.06)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return simulate_rows(
        DRIVERS,
        layers=(4, 8),
        coefficients=(-4.0, 4.0, 8.0),
        n_controls=2,
        n_questions=12,
        seeds=(0, 1),
        seed=3,
        unjudged=0.02,
    )


@pytest.fixture(scope="module")
def curves(rows) -> pd.DataFrame:
    return gap_curves(rows, n_boot=100)


def _labels(ax) -> list[str]:
    return sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_"))


def test_write_report_files_and_tables(rows, tmp_path):
    rows = rows[rows.layer.isin([-1, 4]) & rows.driver.ne("random-1")]  # fewer panels: faster
    paths = write_report(rows, tmp_path / "rep", title="Test sweep", n_boot=100, dpi=40)
    expected = {
        "report",
        "gap_vs_coefficient",
        "compliance_by_condition",
        "heatmap_values",
        "heatmap_goal_guarding",
        "heatmap_sycophancy",
    }
    assert set(paths) == expected
    for key, path in paths.items():
        assert path.exists() and path.parent == tmp_path / "rep"
        if key != "report":
            assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000
    text = paths["report"].read_text()
    assert text.startswith("# Test sweep")
    for key in expected - {"report"}:
        assert f"]({key}.png)" in text
    assert "| term | estimate | se | ci_low | ci_high | p | effect |" in text
    assert "| monitored:coef[values@L4] |" in text
    assert "| driver | layer | coefficient | compliance_monitored |" in text
    assert "| driver | layer | unit | n_obs | slope |" in text
    assert "Unsteered gap:" in text
    # every gap-table row of the report is a cell of gap_curves
    n_cells = len(gap_curves(rows, n_boot=0))
    gap_section = text.split("### Gap per cell")[1]
    assert sum(line.startswith("| ") for line in gap_section.splitlines()) == n_cells + 1  # + header


def test_gap_plot_has_one_series_per_driver_and_control(curves):
    fig = plot_gap_vs_coefficient(curves)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["layer 4", "layer 8"]
    for ax in axes:
        assert _labels(ax) == sorted([*DRIVERS, "random-0", "random-1"])
        values = next(line for line in ax.get_lines() if line.get_label() == "values")
        here = curves[(curves.driver == "values") & (curves.layer == int(ax.get_title().split()[1]))]
        assert np.allclose(values.get_ydata(), here.sort_values("coefficient")["gap"])
        assert any(np.allclose(line.get_ydata(), 0) for line in ax.get_lines() if line.get_label() == "_zero")
        assert len(ax.collections) == len(DRIVERS) + 1  # a CI ribbon per driver + the control band
        assert ax.get_xlabel() == "steering coefficient"
    assert "gap" in axes[0].get_ylabel()
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(DRIVERS) <= set(legend_texts) and any("random controls" in t for t in legend_texts)


def test_gap_plot_band_matches_controls(curves):
    band = control_band(curves=curves)
    fig = plot_gap_vs_coefficient(curves, band)
    ax = fig.axes[0]
    band_poly = ax.collections[0]  # drawn first
    ys = band_poly.get_paths()[0].vertices[:, 1]
    b = band[band.layer == 4]
    assert ys.max() == pytest.approx(b["band_high"].max()) and ys.min() == pytest.approx(b["band_low"].min())


def test_heatmap_centred_and_annotated(curves):
    fig = plot_heatmap(curves, "values")
    ax = fig.axes[0]
    image = ax.images[0]
    pivot = curves[curves.driver == "values"].pivot_table(index="layer", columns="coefficient", values="gap")
    assert np.allclose(image.get_array(), pivot.to_numpy())
    assert image.norm.vmin == pytest.approx(-image.norm.vmax)
    assert image.get_cmap().name == "RdBu_r"
    assert len(ax.texts) == pivot.size
    assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "8"]
    with pytest.raises(ValueError, match="drivers present"):
        plot_heatmap(curves, "nope")


def test_compliance_plot_panels(rows):
    fig = plot_compliance_by_condition(rows)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "goal_guarding",
        "sycophancy",
        "values",
        "random controls (mean)",
    ]
    for ax in axes:
        assert _labels(ax) == sorted(f"L{lay} {c}" for lay in (4, 8) for c in ("monitored", "unmonitored"))
        for line in ax.get_lines():
            assert np.all((line.get_ydata() >= 0) & (line.get_ydata() <= 1))


def test_multiple_contexts_split_into_sections(tmp_path):
    small = simulate_rows({"values": (0.0, 0.1)}, layers=(4,), coefficients=(4.0,), n_controls=1, n_questions=5)
    both = pd.concat([small, small.assign(variant="informative")], ignore_index=True)
    paths = write_report(both, tmp_path, n_boot=0, dpi=40)
    assert "gap_vs_coefficient_base" in paths and "gap_vs_coefficient_informative" in paths
    text = paths["report"].read_text()
    assert "## variant = base" in text and "## variant = informative" in text
    with pytest.raises(ValueError, match="filter the frame"):
        plot_gap_vs_coefficient(gap_curves(both, n_boot=0))


def test_baseline_only_and_empty(tmp_path):
    only = simulate_rows({}, n_controls=0, n_questions=5, seeds=(0,), layers=())
    assert set(only.driver) == {"none"}
    paths = write_report(only, tmp_path, n_boot=0)
    assert set(paths) == {"report"}
    assert "Unsteered gap:" in paths["report"].read_text()
    with pytest.raises(ValueError, match="no result rows"):
        write_report(only.iloc[:0], tmp_path)


def test_markdown_table_format():
    df = pd.DataFrame(
        {
            "driver": ["a|b"],
            "coefficient": [4.0],
            "gap": [0.12345],
            "p": [0.000123],
            "outside": [True],
            "coefficients_outside": [[2.0, 8.0]],
            "ci_low": [np.nan],
        }
    )
    text = markdown_table(df)
    assert text.splitlines()[0] == "| driver | coefficient | gap | p | outside | coefficients_outside | ci_low |"
    assert text.splitlines()[2] == "| a\\|b | 4 | 0.123 | 0.00012 | yes | 2, 8 |  |"


def test_report_says_one_control_is_not_testable(tmp_path):
    rows = simulate_rows({"values": (0.0, 0.0005)}, layers=(4,), coefficients=(2.0,), n_controls=1, n_questions=6)
    text = write_report(rows, tmp_path, n_boot=50, dpi=30)["report"].read_text()
    band = text.split("### Against the random-control band")[1].split("###")[0]
    assert "rest on 1 random-control direction(s) per cell" in band
    assert "| values | 4 | 1 | 2 | not testable (1 control) |" in band
    assert "| yes |" not in band and "No driver is testable here" in band
