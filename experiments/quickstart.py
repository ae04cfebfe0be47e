"""The quickstart study: extract the three drivers on the default model, sweep them with a random control
over two layers and a few coefficients under forced choice, then write the report. CPU, a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

from steering.analysis import steerability
from steering.experiments import load_spec
from steering.models import SteeringModel
from steering.report import write_report
from steering.runs import run_spec
from steering.stats import gap_table


def run_quickstart(model: SteeringModel, out: str | Path = "reports/quickstart") -> dict[str, Path]:
    """Run ``specs/quickstart.toml`` on ``model``, print the headline tables, write the report into ``out``."""
    spec = load_spec("quickstart")
    start = time.perf_counter()
    rows = run_spec(spec, model=model)
    paths = write_report(rows, out, title="Quickstart: three drivers on " + model.name)
    took = time.perf_counter() - start
    base = gap_table(rows[rows.driver == "none"], by=["variant"])
    print(f"\nquickstart on {model.name}: {len(rows)} rows in {spec.store_path} ({took:.0f} s)")
    print(
        "unsteered gap:",
        ", ".join(f"{r.variant} {r.gap:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in base.itertuples()),
    )
    slopes = steerability(rows)
    print("\nsteerability (slope of gap vs coefficient):")
    print(slopes.to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    print(f"\nreport: {paths['report']}")
    return paths
