"""Command line: ``steering demo | fetch | info | extract | vectors | gap | sweep | run | report | layers``.

One module per subcommand, each mirroring a Python API function: ``NAME``, ``HELP``, ``configure(parser)`` and
``execute(args)``; heavy imports happen inside ``execute``. Every failure is one line that names the fix (exit
code 2 for bad input); ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from types import ModuleType

from steering.cli import demo, extract, fetch, gap, info, layers, report, run, sweep, vectors

COMMANDS: tuple[ModuleType, ...] = (demo, fetch, info, extract, vectors, gap, sweep, run, report, layers)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# A value that starts with a minus but is no flag: a number or a comma list of numbers ("-0.5,0,0.5", "-1e-3").
NEGATIVE_VALUE = re.compile(r"-(\d|\.\d)[\d.eE+-]*(,\s*-?[\d.eE+-]+)*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steering", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.configure(p)
        p.set_defaults(execute=command.execute)
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """``--opt -0.5,0,0.5`` -> ``--opt=-0.5,0,0.5``: argparse reads a value that starts with ``-`` as a flag unless
    it is one plain number, so a list of coefficients starting with a negative one would fail as written."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_VALUE.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.execute(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished rows are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for users; the traceback with -v
        if args.verbose:
            raise
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def error_line(exc: BaseException) -> str:
    """One line for a failure: the message itself for our errors, with the exception type for anything else."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, ValueError) or type(exc).__module__.startswith("steering."):
        return message  # our own errors already name the fix
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or folder; check the path"
    return f"{message} ({type(exc).__name__}; rerun with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
