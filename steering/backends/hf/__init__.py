"""The hf backend: plain transformers in this process, the reference every other backend is tested against.

``SteeringModel`` (``model.py``) steers through forward hooks on the decoder blocks (the hooks engine's own driver,
``steering.hooks.drive``); ``PrefixSession`` (``session.py``) is its prefix-cached scoring session: the KV cache of
a shared prompt prefix computed once and reused by every scored row.
"""

from steering.backends.hf.model import SteeringModel
from steering.backends.hf.session import PrefixSession

__all__ = ["PrefixSession", "SteeringModel"]
