"""The nnsight backend: steering and capture inside nnsight traces (local, or remote on NDIF).

``model.py`` has ``NNsightModel`` and ``TracedModel`` (the driver); ``hooks.py`` the hook adapter that edits the
decoder-block outputs inside a trace with the hooks engine's ``Plan``. nnsight is imported lazily.
"""

from steering.backends.nnsight.model import NNsightModel, TracedModel

__all__ = ["NNsightModel", "TracedModel"]
