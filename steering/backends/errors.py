"""The typed error of the backend contract (``steering.backends.protocol``)."""

from __future__ import annotations


class Unsupported(ValueError):
    """This backend cannot do what was asked; the message says what to use instead (another method, scorer or
    backend). A ``ValueError``, so callers that caught those keep working."""


class UnsupportedAttribute(Unsupported, AttributeError):
    """An attribute this backend does not have (e.g. ``model.model`` on an engine): ``getattr(m, name, None)`` and
    ``hasattr`` see it missing; using it raises ``Unsupported``."""
