"""``steering layers``: compare layers by steerability slope and the layer x coefficient gap table."""

from __future__ import annotations

import argparse

NAME = "layers"
HELP = "compare layers: steerability slope and the layer x coefficient gap table per driver"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a results .sqlite file (or a spec .toml)")
    p.add_argument("--run", default=None)
    p.add_argument("--driver", default=None, help="one driver (default: all)")


def execute(args: argparse.Namespace) -> None:
    import pandas as pd

    from steering.analysis import layer_table, steerability
    from steering.baseline import is_baseline
    from steering.runs import load_rows

    rows = load_rows(args.store, args.run)
    slopes = steerability(rows)
    if args.driver:
        slopes = slopes[slopes.driver == args.driver]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(slopes.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        drivers = [args.driver] if args.driver else sorted(d for d in rows.driver.unique() if not is_baseline(d))
        for driver in drivers:
            print(f"\ngap by layer x coefficient: {driver}")
            print(layer_table(rows, driver).to_string(float_format=lambda x: f"{x:+.3f}"))
