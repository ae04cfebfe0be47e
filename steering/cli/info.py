"""``steering info``: a model's layers, d_model, chat template and residual norms."""

from __future__ import annotations

import argparse

from steering.cli._backend import add_backend

NAME = "info"
HELP = "print a model's layers, d_model, chat template and residual norms"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, local folder, .gguf file, 'default' or 'organism'")
    add_backend(p)


def execute(args: argparse.Namespace) -> None:
    from steering import load_model

    model = load_model(args.model, backend=args.backend)
    norms = model.residual_norms()
    print(model)
    layers_path = getattr(model, "layers_path", "inside the vLLM engine")
    print(f"layers path: {layers_path}; chat template: {'yes' if model.has_chat_template else 'no'}")
    print("mean residual norm per layer:")
    for i, n in enumerate(norms.tolist()):
        print(f"  layer {i:3d}  {n:10.2f}")
