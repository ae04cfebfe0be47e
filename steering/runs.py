"""Run a sweep spec end to end and read finished runs back: the functions the CLI and the studies share."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from steering.backends.protocol import Backend
from steering.report import write_report
from steering.spec import JUDGE, SweepSpec
from steering.store import ResultStore
from steering.sweep import run_sweep


def load_rows(store_or_spec: str | Path, run: str | None = None) -> pd.DataFrame:
    """All rows of a store (a .sqlite file, or the store a spec .toml names), optionally one run."""
    path = Path(store_or_spec)
    if path.suffix == ".toml":
        spec = SweepSpec.from_toml(path)
        path, run = spec.store_path, run or spec.name
    if not path.exists():
        raise ValueError(f"result store {path} does not exist; run the sweep first")
    with ResultStore.open_for_reading(path) as store:
        rows = store.frame(run)
    if rows.empty:
        raise ValueError(f"no rows for run {run!r} in {path}")
    return rows


def report_store(store_or_spec: str | Path, run: str | None = None, out: str | Path | None = None) -> dict[str, Path]:
    """Write the Markdown report and plots for a store (default folder: ``reports/<store stem>``)."""
    rows = load_rows(store_or_spec, run)
    out = Path(out) if out else Path("reports") / Path(store_or_spec).stem
    return write_report(rows, out, title=f"Compliance gap: {', '.join(sorted(rows.run.unique()))}")


def unjudged_note(rows: pd.DataFrame) -> str:
    """A line for the rows of a judged run that have no verdict yet (empty when there are none)."""
    if "scorer" not in rows or not (rows.scorer == JUDGE).any():
        return ""
    missing = int(rows.compliance.isna().sum())
    if not missing:
        return ""
    return f"{missing} of {len(rows)} rows have no verdict yet (the judge failed); rerun the same command to judge them"


def run_and_report(
    spec: SweepSpec | str | Path, model: Backend | None = None, report_dir: str | Path | None = None
) -> pd.DataFrame:
    """Run (or resume) a sweep spec (a ``SweepSpec`` or a TOML file) and optionally write its report; returns the
    rows. Packaged specs by name as well: ``steering.experiments.run_spec("quickstart")``."""
    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_toml(spec)
    rows = run_sweep(spec, model=model)
    if report_dir is not None:
        write_report(rows, report_dir, title=f"Compliance gap: {spec.name}")
    return rows
