"""``steering sweep``: a drivers x layers x coefficients grid given on the command line."""

from __future__ import annotations

import argparse

from steering.cli._backend import add_backend

NAME = "sweep"
HELP = "run a drivers x layers x coefficients grid given on the command line"


def _numbers(text: str, flag: str, kind: type) -> list:
    """A comma list of ``kind`` (int or float); a bad item is an error that names ``flag``."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            out.append(kind(item))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{flag} {text!r}: {item!r} is not {what}; pass a comma list such as 1,2,3") from None
    return out


def _ints(text: str, flag: str) -> list[int]:
    return _numbers(text, flag, int)


def _floats(text: str, flag: str) -> list[float]:
    return _numbers(text, flag, float)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="run name (the key in the store)")
    p.add_argument("--model", default="default")
    add_backend(p)
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
    p.add_argument("--max-rows", type=int, default=None, help="allow a run of more rows than the default limit")


def execute(args: argparse.Namespace) -> None:
    from steering.runs import unjudged_note
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
        backend=args.backend,
        drivers=drivers,
        control_seeds=_ints(args.controls, "--controls"),
        layers=_ints(args.layers, "--layers"),
        coefficients=_floats(args.coefficients, "--coefficients"),
        relative=args.relative,
        variants=args.prompt.split(","),
        n_questions=args.n,
        seeds=_ints(args.seeds, "--seeds"),
        store=args.store,
        **({} if args.max_rows is None else {"max_rows": args.max_rows}),
    )
    print(f"sweep {spec.name!r}: {spec.check_size():,} rows")
    frame = run_sweep(spec)
    print(f"{len(frame)} rows in {spec.store_path} (run {spec.name!r}); `steering report {spec.store_path}`")
    if note := unjudged_note(frame):
        print(note)
