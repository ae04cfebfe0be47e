"""The unsteered baseline: how its cell and its rows are recognised, and the one place coefficient-0 rows are made.

The baseline cell has driver ``"none"`` (``BASELINE_DRIVER``) and **no layer**: ``compliance.BASELINE.layer`` is
``None``, never a layer number (``-1`` would be the last layer under the one layer rule). Result rows, however,
keep an integer ``layer`` column (the store declares it ``INTEGER NOT NULL``; frames keep ``int64``), so a row
stores ``NO_LAYER`` (-1) there for the baseline: ``row_layer`` is the one conversion, at the row boundary.

Reading old stores: stores have always written -1 for the baseline's layer, and still do, so a store written
before this module existed and one written today read the same. Rows are recognised as baseline rows by their
driver, never by their layer, so the -1 is never taken for a layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

BASELINE_DRIVER = "none"
NO_LAYER = -1  # the ``layer`` value of baseline rows in stores and frames (not a layer: see the module docstring)


def row_layer(layer: int | None) -> int:
    """The ``layer`` a result row stores for a cell's layer: the layer itself, or ``NO_LAYER`` for the baseline."""
    return NO_LAYER if layer is None else int(layer)


def is_baseline(driver: object) -> bool:
    """True for the baseline's driver name."""
    return driver == BASELINE_DRIVER


def zero_rows(rows: pd.DataFrame, cells: pd.DataFrame, match: Sequence[str] = ()) -> pd.DataFrame:
    """Coefficient-0 rows for ``cells`` (one (driver, layer) per row, plus the ``match`` columns): copies of the
    baseline rows of ``rows`` that agree with the cell on ``match`` (every baseline row without ``match``), with the
    cell's driver and layer and coefficient 0; columns as in ``rows``.

    The one place such rows are made: the sweep stores them for a spec's coefficient-0 cells (``sweep.Grid``), so
    tables are complete, and analysis adds them where steered cells lack them (``analysis.attach_baseline``).
    """
    base = rows[rows["driver"] == BASELINE_DRIVER].drop(columns=["driver", "layer"])
    match = list(match)
    added = cells.merge(base, on=match, how="inner") if match else cells.merge(base, how="cross")
    added["coefficient"] = 0.0
    return added[rows.columns]
