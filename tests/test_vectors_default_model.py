"""End to end on the real default model (slow): extract each driver, score layers on the held-out split.

Cost is one forward pass per text up to the deepest requested layer (capture stops there). `values` uses its whole
train split; the other two drivers are printed from a smaller sample to keep the suite within its time budget
(full-split numbers: `steering extract --driver NAME --layers all` prints them).
"""

from __future__ import annotations

import pytest
import torch

from steering.vectors import VectorSet, extract, layer_quality, load_driver

pytestmark = pytest.mark.slow

LAYERS = list(range(10, 19))  # the middle of SmolLM2's 30 layers, where held-out accuracy peaks for `values`


def best_row(model, driver: str, n_train: int | None, layers: list[int]):
    train, test = load_driver(driver, "train")[:n_train], load_driver(driver, "test")
    vs = extract(model, train, layers=layers, driver=driver, batch_size=32, progress=False)
    vs.quality = layer_quality(model, vs, test, batch_size=32)
    best = vs.best_layers(1)[0]
    row = vs.quality.set_index("layer").loc[best]
    print(
        f"\n{driver}: best layer {best}, held-out projection accuracy {row.accuracy:.3f}, "
        f"separation (Cohen's d) {row.separation:.2f}, {len(train)} train / {len(test)} test pairs"
    )
    return vs, best, row


def test_values_vector_separates_held_out_pairs(default_model, tmp_path):
    vs, best, row = best_row(default_model, "values", None, LAYERS)
    assert vs.layers == LAYERS and all(abs(norm - 1.0) < 1e-5 for norm in vs.norms().values())
    assert row.accuracy == vs.quality["accuracy"].max()
    assert row.accuracy > 0.6
    # the file carries the real model's name and loads back against it, bit-exactly
    loaded = VectorSet.load(vs.save(tmp_path / "values.safetensors"), model=default_model)
    assert loaded.model == default_model.name and all(torch.equal(loaded[i], vs[i]) for i in vs.layers)


@pytest.mark.parametrize("driver", ["goal_guarding", "sycophancy"])
def test_other_drivers_print_held_out_accuracy(default_model, driver):
    vs, best, row = best_row(default_model, driver, 64, list(range(14, 24, 2)))
    assert 0.0 <= row.accuracy <= 1.0 and row.n_pairs == len(load_driver(driver, "test"))
    assert row.accuracy == vs.quality["accuracy"].max()
