"""Command line: ``steering demo | fetch | info | extract | vectors | gap | sweep | layers | report | run``.

Each command mirrors a Python API function; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS: dict[str, tuple[str, callable]] = {}


def command(name: str, help: str):
    """Register ``func(args)`` as a subcommand; ``func.configure(parser)`` adds its arguments."""

    def register(func):
        COMMANDS[name] = (help, func)
        return func

    return register


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="convert again even if the cache has it")


@command("fetch", "download and convert the offline default model into the cache")
def cmd_fetch(args: argparse.Namespace) -> None:
    from steering.default_model import fetch_default_model

    print(fetch_default_model(force=args.force))


cmd_fetch.configure = _fetch_args


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, local folder, .gguf file or 'default'")


@command("info", "print a model's layers, d_model, chat template and residual norms")
def cmd_info(args: argparse.Namespace) -> None:
    from steering import load_model

    model = load_model(args.model)
    norms = model.residual_norms()
    print(model)
    print(f"layers path: {model.layers_path}; chat template: {'yes' if model.has_chat_template else 'no'}")
    print("mean residual norm per layer:")
    for i, n in enumerate(norms.tolist()):
        print(f"  layer {i:3d}  {n:10.2f}")


cmd_info.configure = _info_args


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--quick", action="store_true", help="the toy steering demo only (no sweep)")


@command("demo", "run the quickstart study on the default model (or a toy steering demo with --quick)")
def cmd_demo(args: argparse.Namespace) -> None:
    from steering.demo import run_demo

    run_demo(args.model, quick=args.quick)


cmd_demo.configure = _demo_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steering", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _load_plugins()
    for name, (help, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        getattr(func, "configure", lambda parser: None)(p)
        p.set_defaults(func=func)
    return parser


def _load_plugins() -> None:
    """Import modules that register further commands (they live beside the API they mirror)."""
    import importlib

    for module in ("steering.vectors_cli", "steering.gap_cli", "steering.sweep_cli", "steering.backends_cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
