"""``steering vectors show | export-gguf``: inspect vector files or convert them."""

from __future__ import annotations

import argparse

from steering.cli._backend import add_backend
from steering.cli.extract import format_quality

NAME = "vectors"
HELP = "inspect vector files (show) or convert them (export-gguf)"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vectors_command", required=True)
    show = sub.add_parser("show", help="metadata, per-layer norms and (with --model) held-out quality")
    show.add_argument("file")
    show.add_argument("--model", help="compute held-out quality on this model")
    add_backend(show)
    show.add_argument("--data", help="held-out data for vectors not made from a packaged driver (its test split)")
    show.add_argument("--batch-size", type=int, default=16)
    export = sub.add_parser("export-gguf", help="write a llama.cpp control-vector GGUF")
    export.add_argument("file")
    export.add_argument("out")
    export.add_argument("--model-hint", help="controlvector.model_hint (default: the vectors' model name)")


def execute(args: argparse.Namespace) -> None:
    from steering.vectors import VectorSet, export_gguf

    if args.vectors_command == "export-gguf":
        vs = VectorSet.load(args.file)
        print(f"wrote {export_gguf(vs, args.out, model_hint=args.model_hint)} ({len(vs)} layers)")
        return
    vs = VectorSet.load(args.file)
    for key, value in vs.metadata().items():
        print(f"{key:15s} {value}")
    print("layer  norm")
    for layer, norm in vs.norms().items():
        print(f"{layer:5d}  {norm:.4f}")
    if args.model:
        _show_quality(vs, args)


def _show_quality(vs, args: argparse.Namespace) -> None:
    from steering import load_model
    from steering.vectors import DRIVERS, layer_quality, load_pairs

    source = args.data or (vs.driver if vs.driver in DRIVERS else None)
    if source is None:
        raise ValueError(f"driver {vs.driver!r} has no packaged test split; pass --data FILE with held-out pairs")
    test = load_pairs(source, "test")
    model = load_model(args.model, backend=args.backend)
    vs.check_model(model, strict=False)
    quality = layer_quality(model, vs, test, batch_size=args.batch_size)
    print(f"held-out quality on {model.name} ({len(test)} test pairs of {source}):")
    print(format_quality(quality))
