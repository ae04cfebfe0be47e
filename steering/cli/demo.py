"""``steering demo``: the organism study (a known positive), another packaged study, or a toy steering demo."""

from __future__ import annotations

import argparse

from steering.cli._backend import add_backend

NAME = "demo"
HELP = "run the organism study: a model with a planted compliance gap, three drivers, controls, readouts"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="organism", help="packaged study to run (e.g. organism, quickstart)")
    p.add_argument("--model", default=None, help="override the spec's model (hub id, folder, 'default', 'organism')")
    p.add_argument("--quick", action="store_true", help="the toy steering demo only (no sweep)")
    add_backend(p, from_spec=True)


def execute(args: argparse.Namespace) -> None:
    from steering import load_model
    from steering.experiments.demo import run_toy
    from steering.experiments.study import run_study

    if args.quick:
        run_toy(load_model(args.model or "default", backend=args.backend or "hf"))
        return
    if args.backend is not None:  # the spec's model (or --model) on another backend
        from steering.experiments import load_spec

        spec = load_spec(args.spec)
        model = load_model(args.model or spec.model, dtype=spec.dtype, device=spec.device, backend=args.backend)
    else:
        model = load_model(args.model) if args.model else None
    run_study(args.spec, model)
