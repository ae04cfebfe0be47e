"""End to end on the real default model (slow): extract each driver at all layers, score layers on the test split.

Each driver costs one forward pass per text over its whole dataset (about 500 texts of ~140 tokens at all 30 layers),
a few minutes of CPU; select one with ``-k values``.
"""

from __future__ import annotations

import pytest
import torch
from steering.vectors import DRIVERS, VectorSet, extract, layer_quality, load_driver

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    from steering import load_model
    from steering.default_model import default_model_dir

    if not (default_model_dir() / "config.json").exists():
        pytest.skip("the default model is not cached; run `steering fetch`")
    return load_model("default")


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_vectors_separate_held_out_pairs(model, driver, tmp_path):
    train, test = load_driver(driver, "train"), load_driver(driver, "test")
    vs = extract(model, train, layers="all", driver=driver, batch_size=32, progress=False)
    assert vs.layers == list(range(model.n_layers)) == list(range(30))
    assert all(abs(norm - 1.0) < 1e-5 for norm in vs.norms().values())
    vs.quality = layer_quality(model, vs, test, batch_size=32)
    best = vs.best_layers(1)[0]
    row = vs.quality.set_index("layer").loc[best]
    print(
        f"\n{driver}: best layer {best}, held-out projection accuracy {row.accuracy:.3f}, "
        f"separation (Cohen's d) {row.separation:.2f}, {len(train)} train / {len(test)} test pairs"
    )
    assert row.accuracy == vs.quality["accuracy"].max()
    if driver == "values":
        assert row.accuracy > 0.6
    # the file carries the real model's name and loads back against it, bit-exactly
    loaded = VectorSet.load(vs.save(tmp_path / f"{driver}.safetensors"), model=model)
    assert loaded.model == model.name and all(torch.equal(loaded[i], vs[i]) for i in vs.layers)
