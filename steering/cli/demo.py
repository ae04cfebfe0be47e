"""``steering demo``: the quickstart study on the default model, or a toy steering demo (``--quick``)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "run the quickstart study on the default model (or a toy steering demo with --quick)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--quick", action="store_true", help="the toy steering demo only (no sweep)")


def execute(args: argparse.Namespace) -> None:
    from steering import load_model
    from steering.experiments.demo import run_toy
    from steering.experiments.quickstart import run_quickstart

    model = load_model(args.model)
    if args.quick:
        run_toy(model)
    else:
        run_quickstart(model)
