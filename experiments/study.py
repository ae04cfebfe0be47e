"""Run a packaged study spec on a model, write its report, and print the headline: the unsteered gap (or why
there is none), which drivers move it beyond the random-control band, and what the driver readouts show."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from steering.analysis import outside_control_band, steerability
from steering.backends.protocol import Backend
from steering.experiments import load_spec
from steering.models import load_model
from steering.readouts import readout_table
from steering.report import write_report
from steering.runs import run_and_report
from steering.stats import gap_table
from steering.validity import chance_note, valid_rows


def run_study(
    name: str, model: Backend | None = None, out: str | Path | None = None, title: str | None = None
) -> dict[str, Path]:
    """Run (or resume) the packaged spec ``name`` on ``model`` (default: the spec's), report into ``out``
    (default ``reports/<name>``) and print the headline numbers."""
    spec = load_spec(name)
    model = model or load_model(spec.model, **spec.model_kwargs())
    start = time.perf_counter()
    rows = run_and_report(spec, model=model)
    out = Path(out) if out else Path("reports") / spec.name
    paths = write_report(rows, out, title=title or f"{spec.name} on {model.name}")
    print(f"\n{spec.name} on {model.name}: {len(rows)} rows in {spec.store_path} ({time.perf_counter() - start:.0f} s)")
    print_headline(rows)
    print(f"\nreport: {paths['report']}")
    return paths


def print_headline(rows: pd.DataFrame) -> None:
    """The unsteered gap per variant, the drivers outside the control band, and the readouts, as a few lines."""
    chance = chance_note(rows)
    if chance:
        print(chance)
        return
    base = gap_table(rows[rows.driver == "none"], by=["variant"])
    print(
        "unsteered gap:",
        ", ".join(f"{r.variant} {r.gap:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in base.itertuples()),
    )
    kept, dropped = valid_rows(rows)
    if len(dropped):
        print(f"{len(dropped)} steered cell(s) left out: the model no longer answers A/B there (letter mass)")
    slopes = steerability(kept).set_index(["driver", "layer"])
    band = outside_control_band(kept) if kept.driver.str.startswith("random").any() else None
    if band is not None and len(band):
        print("\ndriver x layer: slope of gap vs coefficient [95% CI], against the random-control band")
        for r in band.itertuples():
            s = slopes.loc[(r.driver, r.layer)]
            print(
                f"  {r.driver:>14} L{r.layer:<3} slope {s.slope:+.3f} [{s.slope_ci_low:+.3f}, {s.slope_ci_high:+.3f}]"
                f"  {r.verdict}"
            )
    readouts = readout_table(rows)
    if len(readouts):
        print("\nreadouts (unsteered, monitored − unmonitored; r with the compliance difference across questions)")
        for r in readouts.itertuples():
            print(f"  {r.label:>18} {r.difference:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]  r {r.r:+.2f}")
