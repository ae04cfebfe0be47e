"""The drivers study: extract the three driver vectors at every layer, rank layers on the held-out split, and
save each driver plus random controls as safetensors (and llama.cpp GGUF) files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from steering.backends.protocol import Backend
from steering.vectors import DRIVERS, export_gguf, extract, layer_quality, load_driver


def run_drivers(
    model: Backend,
    out: str | Path = "vectors_out",
    drivers: tuple[str, ...] = DRIVERS,
    method: str = "mean_diff",
    control_seeds: tuple[int, ...] = (0, 1, 2),
    n_pairs: int | None = None,
) -> pd.DataFrame:
    """Write ``out/<driver>.safetensors`` (+ ``.gguf``) and controls; return held-out quality per driver x layer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for driver in drivers:
        train = load_driver(driver, "train")[:n_pairs]
        vs = extract(model, train, layers="all", method=method, driver=driver)
        quality = layer_quality(model, vs, load_driver(driver, "test"))
        tables.append(quality.assign(driver=driver))
        vs.save(out / f"{driver}.safetensors")
        export_gguf(vs, out / f"{driver}.gguf")
        for seed in control_seeds:
            vs.random_like(seed).save(out / f"{driver}-random-{seed}.safetensors")
    return pd.concat(tables, ignore_index=True)
