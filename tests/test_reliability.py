"""Holes a skeptical user found: one layer rule with one message everywhere, and the context length checked on every
path (capture and extraction as well as generation)."""

from __future__ import annotations

import pytest
import torch

from steering import Intervention
from steering.vectors import ContrastPair, extract

OUT_OF_RANGE = r"layer 3 is out of range: the model has 3 layers \(0\.\.2, or -3\.\.-1 from the end\)"


@pytest.fixture(scope="module")
def tiny(tiny_chat):
    return tiny_chat


def test_one_layer_rule_and_one_message_everywhere(tiny):
    vector = torch.ones(64)
    paths = {
        "intervention(relative=True)": lambda layer: tiny.intervention(layer, vector, 0.5, relative=True),
        "steer": lambda layer: tiny.steer([Intervention(layer, vector, 1.0)]).__enter__(),
        "capture": lambda layer: tiny.capture(["hello there"], [layer]),
        "extract": lambda layer: extract(tiny, [ContrastPair("q", "(A", "(B")], layers=[layer], progress=False),
    }
    for name, call in paths.items():
        with pytest.raises(ValueError, match=OUT_OF_RANGE):
            call(3)
        assert name  # every path raised the same message
    # negative layers count from the end on every path
    last = tiny.capture(["hello there"], [2])[2]
    assert torch.equal(tiny.capture(["hello there"], [-1])[2], last)  # keyed by the resolved index
    relative = [tiny.intervention(layer, vector, 0.5, relative=True).coefficient for layer in (-1, 2)]
    assert relative[0] == relative[1]
    assert list(extract(tiny, [ContrastPair("q", "(A", "(B")], layers=[-1], progress=False).layers) == [2]


def test_capture_and_extract_refuse_texts_longer_than_the_context(tiny):
    limit = tiny.model.config.max_position_embeddings
    long_text = "word " * (limit + 20)
    with pytest.raises(ValueError, match=f"takes at most {limit}"):
        tiny.capture([long_text], [0])
    with pytest.raises(ValueError, match=f"takes at most {limit}"):
        extract(tiny, [ContrastPair(long_text, "(A", "(B")], layers=[0], progress=False)
