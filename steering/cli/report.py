"""``steering report``: a Markdown report with plots for a finished (or partial) run."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "write a Markdown report with plots for a finished (or partial) run"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a results .sqlite file (or a spec .toml: its store)")
    p.add_argument("--run", default=None, help="run name (default: every run in the store)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<store name>)")


def execute(args: argparse.Namespace) -> None:
    from steering.runs import report_store

    paths = report_store(args.store, run=args.run, out=args.out)
    print(paths["report"])
