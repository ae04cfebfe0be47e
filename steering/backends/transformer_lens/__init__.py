"""The transformer_lens backend: a TransformerLens ``TransformerBridge`` around the Hugging Face model.

``model.py`` has ``TransformerLensModel`` (the driver); ``hooks.py`` the hook adapter that drives the hooks engine's
``Plan`` through the bridge's ``blocks.{L}.hook_resid_post`` hook points. TransformerLens is imported lazily.
"""

from steering.backends.transformer_lens.model import TransformerLensModel

__all__ = ["TransformerLensModel"]
