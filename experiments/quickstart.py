"""The quickstart study: extract the three drivers on the default model, sweep them with a random control
over two layers and a few coefficients under forced choice, then write the report. CPU, a few minutes.

The default model is a known negative: its forced-choice baseline is at chance, and the report says so."""

from __future__ import annotations

from pathlib import Path

from steering.backends.protocol import Backend
from steering.experiments.study import run_study


def run_quickstart(model: Backend, out: str | Path = "reports/quickstart") -> dict[str, Path]:
    """Run ``specs/quickstart.toml`` on ``model``, print the headline, write the report into ``out``."""
    return run_study("quickstart", model, out, title="Quickstart: three drivers on " + model.name)
