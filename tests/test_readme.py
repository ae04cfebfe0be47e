"""The README's first Python example runs as written and does what it says (slow: the default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_quick_example_runs_and_steers(default_model, monkeypatch):
    import steering

    monkeypatch.setattr(steering, "load_model", lambda spec="default", **kw: default_model)
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    logits = scope["logits"]
    assert logits.shape[0] == 2
    assert not torch.allclose(logits[0], logits[1])  # row 1 steered, row 0 not
    with torch.no_grad():
        plain = default_model.model(**scope["enc"].inputs).logits
    assert torch.equal(plain[0], logits[0])  # coefficient 0 on row 0: bit-identical
