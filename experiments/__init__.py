"""The studies: TOML specs under ``specs/`` plus small runners built only from the layers below.

``quickstart`` (what ``make demo`` runs), ``drivers``, ``strengths``, ``layers``, ``ablations`` and the ``paper``
recipes for large models; see ``experiments/README.md``. ``run_spec("quickstart")`` runs a packaged spec by name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from steering import runs
from steering.backends.protocol import Backend
from steering.runs import load_rows, report_store
from steering.spec import SweepSpec

__all__ = ["load_rows", "load_spec", "report_store", "run_spec", "spec_names", "spec_path"]


def spec_names() -> list[str]:
    """Names of the packaged specs."""
    return sorted(p.name[:-5] for p in (resources.files("steering.experiments") / "specs").iterdir())


def spec_path(name: str) -> Path:
    """A packaged spec by name (``quickstart``, ``strengths``, ...) or a path to a TOML file."""
    if Path(name).suffix == ".toml" or Path(name).exists():
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"spec file {path} does not exist")
        return path
    packaged = resources.files("steering.experiments") / "specs" / f"{name}.toml"
    if not packaged.is_file():
        raise ValueError(f"unknown spec {name!r}; packaged specs: {', '.join(spec_names())}")
    return Path(str(packaged))


def load_spec(spec: str | Path | SweepSpec) -> SweepSpec:
    """A ``SweepSpec`` from a packaged name, a TOML file, or as given."""
    return spec if isinstance(spec, SweepSpec) else SweepSpec.from_toml(spec_path(str(spec)))


def run_spec(
    spec: str | Path | SweepSpec, model: Backend | None = None, report_dir: str | Path | None = None
) -> pd.DataFrame:
    """``steering.runs.run_and_report`` for a packaged spec name as well as a TOML file or a ``SweepSpec``."""
    return runs.run_and_report(load_spec(spec), model, report_dir)
