"""steering: activation steering for alignment-faking research.

Extract a residual-stream vector per driver of the compliance gap (values, goal guarding, developer
sycophancy), steer with it during scoring or generation, sweep drivers x layers x coefficients, and report.
"""

from steering.hooks import At, Intervention, Positions, RowLayout
from steering.models import Encoded, SteeringModel, load_model, wrap

__version__ = "0.2.0"

__all__ = [
    "At",
    "Encoded",
    "Intervention",
    "Positions",
    "RowLayout",
    "SteeringModel",
    "load_model",
    "wrap",
    "__version__",
]
