"""``steering info``: a model's layers, d_model, chat template and residual norms."""

from __future__ import annotations

import argparse

NAME = "info"
HELP = "print a model's layers, d_model, chat template and residual norms"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, local folder, .gguf file or 'default'")


def execute(args: argparse.Namespace) -> None:
    from steering import load_model

    model = load_model(args.model)
    norms = model.residual_norms()
    print(model)
    print(f"layers path: {model.layers_path}; chat template: {'yes' if model.has_chat_template else 'no'}")
    print("mean residual norm per layer:")
    for i, n in enumerate(norms.tolist()):
        print(f"  layer {i:3d}  {n:10.2f}")
