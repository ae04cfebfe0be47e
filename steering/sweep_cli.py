"""``steering run | sweep | report | layers``: run a grid spec, inline grids, reports, layer comparison."""

from __future__ import annotations

import argparse

from steering.cli import command


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a TOML spec (see experiments/specs/)")
    p.add_argument("--report", default=None, help="write the report to this folder when the sweep ends")


@command("run", "run (or resume) a sweep spec; a killed run resumes where it stopped")
def cmd_run(args: argparse.Namespace) -> None:
    from steering.experiments import run_spec

    run_spec(args.spec, report_dir=args.report)


cmd_run.configure = _run_args


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="run name (the key in the store)")
    p.add_argument("--model", default="default")
    p.add_argument("--driver", action="append", default=[], help="NAME=DATASET_OR_VECTOR_FILE (repeatable)")
    p.add_argument("--controls", default="", help="random-control seeds, e.g. 0,1,2")
    p.add_argument("--layers", required=True, help="comma-separated layers")
    p.add_argument("--coefficients", required=True, help="comma-separated coefficients (0 = unsteered)")
    p.add_argument("--relative", action="store_true", help="coefficients x the layer's mean residual norm")
    p.add_argument("--prompt", default="base", help="prompt variant(s), comma-separated")
    p.add_argument("--n", type=int, default=40, help="questions")
    p.add_argument("--n-pairs", type=int, default=None, help="contrast pairs used per extracted driver")
    p.add_argument("--seeds", default="0")
    p.add_argument("--store", default=None, help="SQLite file (default runs/NAME.sqlite)")


@command("sweep", "run a drivers x layers x coefficients grid given on the command line")
def cmd_sweep(args: argparse.Namespace) -> None:
    from steering.spec import DriverSpec, SweepSpec
    from steering.sweep import run_sweep

    drivers = []
    for item in args.driver:
        name, _, source = item.partition("=")
        if not source:
            raise ValueError(f"--driver {item!r}: use NAME=DATASET or NAME=FILE.safetensors")
        key = "vector" if source.endswith(".safetensors") else "dataset"
        drivers.append(DriverSpec(name=name, **{key: source}, n_pairs=args.n_pairs))
    spec = SweepSpec(
        name=args.name,
        model=args.model,
        drivers=drivers,
        control_seeds=_ints(args.controls),
        layers=_ints(args.layers),
        coefficients=_floats(args.coefficients),
        relative=args.relative,
        variants=args.prompt.split(","),
        n_questions=args.n,
        seeds=_ints(args.seeds),
        store=args.store,
    )
    frame = run_sweep(spec)
    print(f"{len(frame)} rows in {spec.store_path} (run {spec.name!r}); `steering report {spec.store_path}`")


cmd_sweep.configure = _sweep_args


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a results .sqlite file (or a spec .toml: its store)")
    p.add_argument("--run", default=None, help="run name (default: every run in the store)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<store name>)")


@command("report", "write a Markdown report with plots for a finished (or partial) run")
def cmd_report(args: argparse.Namespace) -> None:
    from steering.experiments import report_store

    paths = report_store(args.store, run=args.run, out=args.out)
    print(paths["report"])


cmd_report.configure = _report_args


def _layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a results .sqlite file (or a spec .toml)")
    p.add_argument("--run", default=None)
    p.add_argument("--driver", default=None, help="one driver (default: all)")


@command("layers", "compare layers: steerability slope and the layer x coefficient gap table per driver")
def cmd_layers(args: argparse.Namespace) -> None:
    import pandas as pd

    from steering.analysis import layer_table, steerability
    from steering.experiments import load_rows

    rows = load_rows(args.store, args.run)
    slopes = steerability(rows)
    if args.driver:
        slopes = slopes[slopes.driver == args.driver]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(slopes.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        drivers = [args.driver] if args.driver else sorted(d for d in rows.driver.unique() if d != "none")
        for driver in drivers:
            print(f"\ngap by layer x coefficient: {driver}")
            print(layer_table(rows, driver).to_string(float_format=lambda x: f"{x:+.3f}"))


cmd_layers.configure = _layers_args
