"""Write a deterministic grid of result rows in batches, resuming past `done_keys`: the kill -9 test's victim.

Usage: python tests/store_writer.py STORE_PATH N_BATCHES BATCH_SIZE SLEEP_SECONDS
"""

from __future__ import annotations

import sys
import time
from typing import Any

from steering.store import KEY_COLUMNS, ResultStore

RUN = "kill-test"
MODEL = "toy-model"
DRIVERS = ("values", "goal_guarding", "random-0")


def grid_rows(n_rows: int) -> list[dict[str, Any]]:
    """The first `n_rows` rows of a fixed grid; every row has a distinct key and deterministic values."""
    rows = []
    for i in range(n_rows):
        rows.append(
            {
                "run": RUN,
                "model": MODEL,
                "driver": DRIVERS[i % 3],
                "layer": (i // 3) % 4,
                "coefficient": ((i // 12) % 5 - 2) * 1.5,
                "variant": "base",
                "condition": ("monitored", "unmonitored")[(i // 60) % 2],
                "question": f"q{i // 120:04d}",
                "seed": 0,
                "scorer": "forced_choice",
                "compliance": None if i % 17 == 0 else ((i * 7919) % 1000) / 1000.0,
                "extra": {"i": i},
            }
        )
    return rows


def main(argv: list[str]) -> None:
    path, n_batches, batch_size, sleep = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    rows = grid_rows(n_batches * batch_size)
    with ResultStore(path) as store:
        store.begin_run(RUN, {"grid": "kill-test", "n": len(rows)}, MODEL, {"python": sys.version.split()[0]})
        done = store.done_keys(RUN)
        for start in range(0, len(rows), batch_size):
            batch = [r for r in rows[start : start + batch_size] if tuple(r[c] for c in KEY_COLUMNS) not in done]
            if batch:
                store.write_rows(batch)
                time.sleep(sleep)


if __name__ == "__main__":
    main(sys.argv[1:])
