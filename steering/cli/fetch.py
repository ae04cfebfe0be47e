"""``steering fetch``: download and convert the offline default model, and merge the organism, into the cache."""

from __future__ import annotations

import argparse

NAME = "fetch"
HELP = "download and convert the offline default model (and merge the organism) into the cache"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="convert / merge again even if the cache has them")


def execute(args: argparse.Namespace) -> None:
    from steering.default_model import fetch_default_model
    from steering.organism import fetch_organism

    print(fetch_default_model(force=args.force))
    print(fetch_organism(force=args.force))
