"""Model internals: find decoder blocks, capture the residual stream, intervene on it.

With the backends (``steering/backends/``, one package per library that runs a model) this is the only code that
touches model internals; it imports nothing else of ours. The engine is ``Plan``: interventions grouped per layer,
resolved once per forward call; every backend drives it through ``plan.tracker`` / ``plan.begin`` and ``plan.edit``
(plain transformers through ``drive`` in ``steer.py``, the others through their package's hook adapter).
"""

from .capture import At, capture, select_rows
from .intervention import OPERATIONS, Intervention
from .layers import (
    find_layers,
    find_layers_path,
    find_stack,
    hidden_of,
    model_d_model,
    replace_hidden,
    resolve_layer,
    resolve_layers,
)
from .norms import FIRST_COUNTED, counted, mean_norm, mean_norms, token_norms
from .plan import Plan, steer_module
from .positions import MODES, Positions, PositionTracker, RowLayout, check_layout, row_positions
from .readout import read_last
from .steer import drive, steer

__all__ = [
    "At",
    "FIRST_COUNTED",
    "MODES",
    "OPERATIONS",
    "Intervention",
    "Plan",
    "PositionTracker",
    "Positions",
    "RowLayout",
    "capture",
    "check_layout",
    "counted",
    "drive",
    "find_layers",
    "find_layers_path",
    "find_stack",
    "hidden_of",
    "mean_norm",
    "mean_norms",
    "model_d_model",
    "read_last",
    "replace_hidden",
    "resolve_layer",
    "resolve_layers",
    "row_positions",
    "select_rows",
    "steer",
    "steer_module",
    "token_norms",
]
