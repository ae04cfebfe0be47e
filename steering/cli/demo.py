"""``steering demo``: the organism study (a known positive), another packaged study, or a toy steering demo."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "run the organism study: a model with a planted compliance gap, three drivers, controls, readouts"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="organism", help="packaged study to run (e.g. organism, quickstart)")
    p.add_argument("--model", default=None, help="override the spec's model (hub id, folder, 'default', 'organism')")
    p.add_argument("--quick", action="store_true", help="the toy steering demo only (no sweep)")


def execute(args: argparse.Namespace) -> None:
    from steering import load_model
    from steering.experiments.demo import run_toy
    from steering.experiments.study import run_study

    if args.quick:
        run_toy(load_model(args.model or "default"))
        return
    run_study(args.spec, load_model(args.model) if args.model else None)
