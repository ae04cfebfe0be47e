"""``steering fetch``: download and convert the offline default model into the cache."""

from __future__ import annotations

import argparse

NAME = "fetch"
HELP = "download and convert the offline default model into the cache"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="convert again even if the cache has it")


def execute(args: argparse.Namespace) -> None:
    from steering.default_model import fetch_default_model

    print(fetch_default_model(force=args.force))
