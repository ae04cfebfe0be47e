"""Markdown report with PNG plots of a sweep: gap vs coefficient, layer x coefficient heatmaps, compliance by
condition, plus steerability, control-band and decomposition tables.

Plots use matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas): no pyplot state, no display.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from steering.analysis import (
    BASELINE_DRIVER,
    MIN_CONTROLS,
    attach_baseline,
    control_band,
    decompose,
    gap_curves,
    is_control,
    outside_control_band,
    steerability,
)
from steering.readouts import READOUT_COLUMNS, paired_differences, readout_frame, readout_table
from steering.stats import CONTEXT_COLUMNS, compliance_by_condition, context_columns
from steering.validity import cell_validity, chance_note, valid_rows

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_CONTROL_GREY = "#7f7f7f"
GAP_LABEL = "compliance gap (monitored − unmonitored)"


def _single_context(frame: pd.DataFrame, what: str) -> None:
    varying = [c for c in CONTEXT_COLUMNS if c in frame.columns and frame[c].nunique(dropna=False) > 1]
    if varying:
        raise ValueError(
            f"{what} draws one context, but {varying} vary; filter the frame first "
            f"(e.g. df[df.{varying[0]} == ...]) or use write_report, which splits by context"
        )


def driver_colors(drivers: Sequence[str]) -> dict[str, str]:
    """A stable colour per non-control driver (sorted by name), shared by every plot of a report."""
    names = sorted({str(d) for d in drivers if not is_control(d) and d != BASELINE_DRIVER})
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def _grid(n: int) -> tuple[int, int]:
    cols = n if n <= 3 else (2 if n == 4 else 3)
    return math.ceil(n / cols), max(cols, 1)


def _steered_layers(curves: pd.DataFrame) -> list[int]:
    return sorted(int(x) for x in curves.loc[curves["driver"] != BASELINE_DRIVER, "layer"].unique())


def plot_gap_vs_coefficient(curves: pd.DataFrame, band: pd.DataFrame | None = None) -> Figure:
    """One panel per layer: a line with CI ribbon per driver, grey control lines over the shaded control band,
    the unsteered gap dotted and a zero line. Takes `gap_curves` output (and optionally `control_band`)."""
    _single_context(curves, "plot_gap_vs_coefficient")
    band = control_band(curves=curves) if band is None else band
    layers = _steered_layers(curves)
    if not layers:
        raise ValueError("no steered rows to plot (only the 'none' baseline); run a sweep with drivers first")
    colors = driver_colors(curves["driver"].unique())
    base = curves[curves["driver"] == BASELINE_DRIVER]
    base_gap = float(base["gap"].iloc[0]) if len(base) else None
    nrows, ncols = _grid(len(layers))
    fig = Figure(figsize=(max(7.5, 4.8 * ncols), 3.6 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        here = curves[curves["layer"] == layer]
        b = band[band["layer"] == layer].sort_values("coefficient")
        if len(b):
            ax.fill_between(
                b["coefficient"],
                b["band_low"],
                b["band_high"],
                color=_CONTROL_GREY,
                alpha=0.25,
                linewidth=0,
                label="_control band",
            )
        for drv, sub in here[here["is_control"]].groupby("driver", sort=True):
            sub = sub.sort_values("coefficient")
            ax.plot(
                sub["coefficient"],
                sub["gap"],
                color=_CONTROL_GREY,
                lw=0.9,
                ls="--",
                alpha=0.8,
                label=str(drv),
            )
        for drv, sub in here[~here["is_control"]].groupby("driver", sort=True):
            sub = sub.sort_values("coefficient")
            color = colors[str(drv)]
            ax.fill_between(
                sub["coefficient"],
                sub["ci_low"],
                sub["ci_high"],
                color=color,
                alpha=0.15,
                linewidth=0,
                label=f"_{drv} CI",
            )
            ax.plot(sub["coefficient"], sub["gap"], color=color, marker="o", ms=4, lw=1.8, label=str(drv))
        ax.axhline(0.0, color="black", lw=0.8, label="_zero")
        if base_gap is not None and not math.isnan(base_gap):
            ax.axhline(base_gap, color="black", lw=1.0, ls=":", label="_unsteered")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("steering coefficient")
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel(GAP_LABEL)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, marker="o", ms=4, lw=1.8, label=d) for d, c in colors.items()]
    if curves["is_control"].any():
        handles.append(
            Patch(
                facecolor=_CONTROL_GREY,
                alpha=0.35,
                edgecolor=_CONTROL_GREY,
                ls="--",
                label="random controls (band, lines)",
            )
        )
    if base_gap is not None:
        handles.append(Line2D([], [], color="black", ls=":", label=f"unsteered gap ({base_gap:+.2f})"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)
    fig.suptitle("Compliance gap vs steering coefficient (shaded: 95% bootstrap CI)")
    return fig


def plot_heatmap(curves: pd.DataFrame, driver: str) -> Figure:
    """Layer x coefficient heatmap of one driver's gap, diverging colours centred at 0, cells annotated
    (* marks p < 0.05 in the gap t-test)."""
    _single_context(curves, "plot_heatmap")
    sub = curves[curves["driver"] == driver]
    if sub.empty:
        raise ValueError(f"driver {driver!r} not in the curves; drivers present: {sorted(curves['driver'].unique())}")
    gap = sub.pivot_table(index="layer", columns="coefficient", values="gap", aggfunc="first")
    pval = sub.pivot_table(index="layer", columns="coefficient", values="p", aggfunc="first").reindex_like(gap)
    values = gap.to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_l, n_c = values.shape
    fig = Figure(figsize=(max(4.5, 0.9 * n_c + 2.5), max(2.6, 0.5 * n_l + 1.6)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu_r", norm=Normalize(-vmax, vmax), aspect="auto")
    for i in range(n_l):
        for j in range(n_c):
            v = values[i, j]
            if np.isnan(v):
                continue
            p = pval.to_numpy()[i, j]
            star = "*" if p == p and p < 0.05 else ""
            ax.text(
                j,
                i,
                f"{v:+.2f}{star}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(v) > 0.6 * vmax else "black",
            )
    ax.set_xticks(range(n_c), [f"{c:g}" for c in gap.columns])
    ax.set_yticks(range(n_l), [str(int(x)) for x in gap.index])
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("layer")
    ax.set_title(f"Compliance gap: {driver}  (* p < 0.05 vs 0)")
    fig.colorbar(image, ax=ax, label="gap (monitored − unmonitored)", shrink=0.9)
    return fig


def plot_compliance_by_condition(df: pd.DataFrame) -> Figure:
    """Monitored (solid) vs unmonitored (dashed) compliance against coefficient: one panel per driver, one
    colour per layer; random controls averaged into one panel. Takes result rows."""
    _single_context(df, "plot_compliance_by_condition")
    rows = attach_baseline(df)
    rows = rows[rows["driver"] != BASELINE_DRIVER]
    if rows.empty:
        raise ValueError("no steered rows to plot (only the 'none' baseline); run a sweep with drivers first")
    rows = rows.assign(panel=rows["driver"].map(lambda d: "random controls (mean)" if is_control(d) else str(d)))
    table = compliance_by_condition(rows, by=["panel", "driver", "layer", "coefficient"])
    table = table.groupby(["panel", "layer", "coefficient", "condition"], as_index=False)["compliance"].mean()
    panels = sorted(table["panel"].unique(), key=lambda p: (p.startswith("random"), p))
    layers = sorted(table["layer"].unique())
    shades = colormaps["viridis"](np.linspace(0.0, 0.85, len(layers)))  # sequential: layers, not drivers
    cmap = {lay: shades[i] for i, lay in enumerate(layers)}
    nrows, ncols = _grid(len(panels))
    fig = Figure(figsize=(max(7.5, 4.6 * ncols), 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        here = table[table["panel"] == panel]
        for (lay, cond), sub in here.groupby(["layer", "condition"], sort=True):
            sub = sub.sort_values("coefficient")
            ax.plot(
                sub["coefficient"],
                sub["compliance"],
                color=cmap[lay],
                marker="o",
                ms=3,
                ls="-" if cond == "monitored" else "--",
                label=f"L{lay} {cond}",
            )
        ax.set_title(panel)
        ax.set_xlabel("steering coefficient")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel("compliance")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=cmap[lay], lw=2, label=f"layer {lay}") for lay in layers]
    handles += [
        Line2D([], [], color="black", ls="-", label="monitored"),
        Line2D([], [], color="black", ls="--", label="unmonitored"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle("Compliance by condition")
    return fig


def plot_readouts(df: pd.DataFrame, max_panels: int = 9) -> Figure:
    """Per question (unsteered rows): the readout difference monitored − unmonitored on each driver vector (x)
    against the compliance difference (y), one panel per ``driver@layer`` (random controls last), r in the title."""
    _single_context(df, "plot_readouts")
    long = readout_frame(df)
    if long.empty:
        raise ValueError("these rows carry no driver readouts (a forced-choice sweep stores them)")
    pairs = paired_differences(long)
    table = readout_table(df)
    order = sorted(table["label"], key=lambda lab: (is_control(str(lab).rpartition("@")[0]), str(lab)))[:max_panels]
    colors = driver_colors([str(lab).rpartition("@")[0] for lab in order])
    nrows, ncols = _grid(len(order))
    fig = Figure(figsize=(max(7.5, 3.6 * ncols), 3.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, label in zip(axes, order):
        sub = pairs[pairs["label"] == label]
        driver = str(label).rpartition("@")[0]
        ax.scatter(sub["readout_diff"], sub["compliance_diff"], s=14, color=colors.get(driver, "grey"), alpha=0.8)
        ax.axhline(0, color="black", lw=0.6)
        ax.axvline(0, color="black", lw=0.6)
        r = table.loc[table["label"] == label, "r"].iloc[0]
        ax.set_title(f"{label}  r = {r:+.2f}" if not math.isnan(r) else f"{label}  r undefined", fontsize=10)
        ax.set_xlabel("readout monitored − unmonitored")
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel("compliance monitored − unmonitored")
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    fig.suptitle("Driver readouts vs compliance difference, per question (unsteered)")
    return fig


# -- markdown ------------------------------------------------------------------------------------------------


def _fmt(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if column in ("p", "slope_p", "spearman_p", "r_p"):
            return f"{value:.2g}"
        if column in ("layer", "coefficient"):
            return f"{value:g}"
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of `df` (selected columns; p-values to 2 significant digits)."""
    columns = [c for c in (columns or df.columns) if c in df.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for record in df[columns].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, c) for v, c in zip(record, columns)) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def _effect(row: pd.Series) -> str:
    if row["kind"] != "interaction":
        return ""
    if row["ci_low"] > 0:
        return "widens gap"
    if row["ci_high"] < 0:
        return "narrows gap"
    return "n.s."


def band_note(out: pd.DataFrame) -> str:
    """The sentence above the control-band table: what the test is and how many controls it rests on."""
    counts = sorted({int(n) for n in out["n_controls"]}) if len(out) else [0]
    n_text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    note = (
        f"The claims below rest on {n_text} random-control direction(s) per cell. A driver is `outside` at a "
        "coefficient when its gap is further from the controls' mean than the 95% prediction interval of one more "
        "random direction (t with n-1 df on the controls' SD), widened by the driver's own CI, Bonferroni-corrected "
        f"over the coefficients compared. With fewer than {MIN_CONTROLS} controls a band has no usable spread, so "
        "the comparison is `not testable`: add control seeds."
    )
    if len(out) and not out["testable"].any():
        note += f" **No driver is testable here: {n_text} control(s) is fewer than {MIN_CONTROLS}.**"
    return note


def _section(
    df: pd.DataFrame, out_dir: Path, suffix: str, n_boot: int, seed: int, dpi: int
) -> tuple[list[str], dict[str, Path]]:
    """Figures and Markdown for one context (one run / model / variant / scorer)."""
    paths: dict[str, Path] = {}
    md: list[str] = []
    chance = chance_note(df)
    if chance:  # the instrument is blind on this model: say so instead of reporting gaps
        md.append(f"**{chance}**\n")
        md.append(markdown_table(compliance_by_condition(df[df["driver"] == BASELINE_DRIVER])) + "\n")
        return md, paths
    validity = cell_validity(df)
    df, dropped = valid_rows(df)
    curves = gap_curves(df, n_boot=n_boot, seed=seed)
    band = control_band(curves=curves)
    steered = curves[curves["driver"] != BASELINE_DRIVER]
    if len(dropped):
        shown = ", ".join(f"{r.driver}@{r.layer} x {r.coefficient:g} ({r.reason})" for r in dropped[:6].itertuples())
        more = f" and {len(dropped) - 6} more" if len(dropped) > 6 else ""
        md.append(
            f"**{len(dropped)} steered cell(s) left out of every table and plot below** (the model no longer "
            f"answers in the format, so their compliance is not a measurement): {shown}{more}.\n"
        )

    base = curves[curves["driver"] == BASELINE_DRIVER]
    if len(base):
        b = base.iloc[0]
        md.append(
            f"**Unsteered gap:** {b['gap']:+.3f} ± {b['gap_sem']:.3f} (SEM), "
            f"95% CI [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}], p = {_fmt(b['p'], 'p')}; "
            f"compliance monitored {b['compliance_monitored']:.3f}, "
            f"unmonitored {b['compliance_unmonitored']:.3f} "
            f"({b['n_questions']} questions, {b['n_seeds']} seeds).\n"
        )

    def save(fig: Figure, key: str) -> None:
        name = f"{key}{suffix}.png"
        fig.savefig(out_dir / name, dpi=dpi, bbox_inches="tight")
        paths[key + suffix] = out_dir / name
        md.append(f"![{key}]({name})\n")

    if len(steered):
        md.append("### Plots\n")
        save(plot_gap_vs_coefficient(curves, band), "gap_vs_coefficient")
        for drv in sorted(d for d in steered["driver"].unique() if not is_control(d)):
            save(plot_heatmap(curves, drv), f"heatmap_{_slug(drv)}")
        save(plot_compliance_by_condition(df), "compliance_by_condition")

        md.append("### Steerability (slope of gap vs coefficient)\n")
        steer = steerability(df)
        md.append(
            markdown_table(
                steer,
                [
                    "driver",
                    "layer",
                    "unit",
                    "n_obs",
                    "slope",
                    "slope_ci_low",
                    "slope_ci_high",
                    "slope_p",
                    "spearman_rho",
                    "spearman_p",
                ],
            )
            + "\n"
        )
        md.append("### Against the random-control band\n")
        if len(band):
            out = outside_control_band(curves=curves)
            md.append(band_note(out) + "\n")
            md.append(
                markdown_table(
                    out,
                    [
                        "driver",
                        "layer",
                        "n_controls",
                        "n_compared",
                        "verdict",
                        "p_min",
                        "coefficients_outside",
                        "coefficients_ci_outside",
                        "max_excess",
                    ],
                )
                + "\n"
            )
        else:
            md.append("No random-control drivers in these results: no band to compare against.\n")

    readouts = readout_table(df)
    if len(readouts):
        md.append("### Driver readouts (unsteered)\n")
        md.append(
            "Projection of the residual stream on each driver's unit vector at the answer position, read in the "
            "scoring forward pass. `difference` = monitored − unmonitored (mean over questions, 95% t-interval); "
            "`r` = Pearson correlation across questions between that difference and the compliance difference. "
            "A driver whose readout moves with the cue and tracks the gap question by question is one the model "
            "represents when it fakes alignment; random controls show what chance looks like.\n"
        )
        md.append(markdown_table(readouts, [c for c in READOUT_COLUMNS if c != "label"]) + "\n")
        save(plot_readouts(df), "readouts")

    md.append("### Decomposition (fractional logit)\n")
    try:
        dec = decompose(df)
        dec = dec.assign(effect=dec.apply(_effect, axis=1))
        md.append(
            "logit P(comply) = b0 + b·monitored + Σ β_d·coef_d + Σ γ_d·monitored·coef_d; "
            "γ_d (interaction rows) is how driver d moves the gap, in logit units per unit coefficient. "
            + ("Random controls are pooled into `controls`. " if df["driver"].map(is_control).any() else "")
            + "SEs are clustered by question.\n"
        )
        md.append(markdown_table(dec, ["term", "estimate", "se", "ci_low", "ci_high", "p", "effect"]) + "\n")
    except ValueError as exc:
        md.append(f"Not fitted: {exc}\n")

    md.append("### Gap per cell\n")
    tests = sorted(set(curves["test"]))
    md.append(f"CI: 95% bootstrap over questions (paired). Test: {'; '.join(tests)}.\n")
    keys = ["driver", "layer", "coefficient"]
    curves = curves.merge(validity[[*keys, "letter_mass"]], on=keys, how="left")
    md.append(
        markdown_table(
            curves,
            [
                "driver",
                "layer",
                "coefficient",
                "compliance_monitored",
                "compliance_unmonitored",
                "gap",
                "gap_sem",
                "ci_low",
                "ci_high",
                "p",
                "n_questions",
                "n_seeds",
                "n_unjudged",
                "letter_mass",
            ],
        )
        + "\n"
    )
    return md, paths


def write_report(
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    title: str = "Compliance gap report",
    *,
    n_boot: int = 2000,
    seed: int = 0,
    dpi: int = 110,
) -> dict[str, Path]:
    """Write report.md and its PNGs into out_dir; returns {"report": path, "<plot name>": path, ...}.

    A frame with several contexts (runs, models, variants or scorers) gets one section each, and its PNG names
    carry the context as a suffix.
    """
    if df.empty:
        raise ValueError("no result rows to report; run a sweep first or check the run name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = context_columns(df)
    lines = [f"# {title}\n"]
    facts = [f"{len(df)} rows", f"{int(df['compliance'].isna().sum())} unjudged"]
    for col in ("run", "model", "variant", "scorer"):
        if col in df.columns:
            facts.append(f"{col}: {', '.join(sorted(map(str, df[col].unique())))}")
    drivers = sorted(map(str, df["driver"].unique()))
    facts.append(f"drivers: {', '.join(drivers)}")
    facts.append(f"layers: {', '.join(str(x) for x in sorted(df['layer'].unique()) if x >= 0)}")
    facts.append(f"coefficients: {', '.join(f'{c:g}' for c in sorted(df['coefficient'].unique()))}")
    facts.append(f"{df['question'].nunique()} questions x {df['seed'].nunique()} seeds")
    lines += [f"- {f}" for f in facts] + [""]
    lines.append(
        "Gap = compliance(monitored) − compliance(unmonitored), the mean over seeds of per-seed gaps. "
        "Where a steered layer has no coefficient-0 rows, the unsteered baseline stands in for "
        "coefficient 0. Drivers named `random*` are random-direction controls.\n"
    )
    paths: dict[str, Path] = {}
    groups = df.groupby(ctx, sort=True) if ctx else [((), df)]
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        suffix = "" if not ctx else "_" + "_".join(_slug(k) for k in key)
        if ctx:
            lines.append("## " + ", ".join(f"{c} = {k}" for c, k in zip(ctx, key)) + "\n")
        else:
            lines.append("## Results\n")
        section, figs = _section(sub, out, suffix, n_boot, seed, dpi)
        lines += section
        paths.update(figs)
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return {"report": report, **paths}
