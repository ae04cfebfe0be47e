"""``steering run``: run (or resume) a sweep spec, packaged by name or a TOML file."""

from __future__ import annotations

import argparse
import dataclasses

from steering.cli._backend import add_backend

NAME = "run"
HELP = "run (or resume) a sweep spec; a killed run resumes where it stopped"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a packaged spec name (quickstart, strengths, ...) or a TOML file")
    p.add_argument("--report", default=None, help="write the report to this folder when the sweep ends")
    p.add_argument("--max-rows", type=int, default=None, help="allow a run of more rows than the spec's max_rows")
    add_backend(p, from_spec=True)


def execute(args: argparse.Namespace) -> None:
    from steering.experiments import load_spec
    from steering.runs import run_and_report, unjudged_note

    spec = load_spec(args.spec)
    if args.backend is not None and args.backend != spec.backend:
        spec = dataclasses.replace(spec, backend=args.backend)  # validated again; a run with rows refuses a change
    if args.max_rows is not None:
        spec.max_rows = args.max_rows
        spec.validate()
    print(f"sweep {spec.name!r}: {spec.check_size():,} rows")
    rows = run_and_report(spec, report_dir=args.report)
    print(f"{len(rows)} rows in {spec.store_path} (run {spec.name!r}); `steering report {spec.store_path}`")
    if note := unjudged_note(rows):
        print(note)
