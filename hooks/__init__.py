"""Model internals: find decoder blocks, capture the residual stream, intervene on it.

This is the only part of ``steering`` that touches model internals; it imports nothing else of ours.
"""

from .capture import At, capture, mean_norms
from .intervene import OPERATIONS, Intervention, hidden_of, model_d_model, steer
from .layers import find_layers, find_layers_path, find_stack
from .positions import MODES, Positions, PositionTracker, RowLayout, row_positions

__all__ = [
    "At",
    "MODES",
    "OPERATIONS",
    "Intervention",
    "PositionTracker",
    "Positions",
    "RowLayout",
    "capture",
    "find_layers",
    "find_layers_path",
    "find_stack",
    "hidden_of",
    "mean_norms",
    "model_d_model",
    "row_positions",
    "steer",
]
