"""The ``--backend`` option of every command that loads a model (one definition, so the choices agree)."""

from __future__ import annotations

import argparse

# steering.models' BACKENDS plus its engine backends (tests/test_cli.py checks they agree; not imported here, so
# `steering --help` stays fast).
CHOICES = ("hf", "transformer_lens", "nnsight", "vllm")
WHAT = "hf (plain transformers), transformer_lens, nnsight or vllm (needs vLLM installed)"


def add_backend(p: argparse.ArgumentParser, from_spec: bool = False) -> None:
    """Add ``--backend``: default ``hf``, or (``from_spec``) the spec's own backend unless given."""
    if from_spec:
        p.add_argument("--backend", choices=CHOICES, default=None, help=f"run the spec on {WHAT} (default: the spec's)")
    else:
        p.add_argument("--backend", choices=CHOICES, default="hf", help=f"load the model on {WHAT} (default: hf)")
