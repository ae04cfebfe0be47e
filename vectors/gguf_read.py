"""Read llama.cpp control vectors (GGUF), ours or from elsewhere (llama.cpp's cvector-generator, repeng).

Layout: ``general.architecture = "controlvector"``, ``controlvector.model_hint``, ``controlvector.layer_count``,
tensors ``direction.{layer + 1}`` float32 [d_model] (llama.cpp numbers control-vector layers from 1).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ARCH = "controlvector"
DIRECTION = re.compile(r"direction\.([1-9][0-9]*)")  # N >= 1 in ASCII digits, no leading zeros


def read_gguf(path: str | Path) -> tuple[dict[str, object], dict[int, np.ndarray]]:
    """(string / int metadata, ``{layer: [d]}``) of a control-vector GGUF, layers back to 0-based indices."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}; this is not a control vector")
    meta = {key: _field(reader, key) for key in ("general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count")}
    vectors = {}
    for tensor in reader.tensors:
        match = DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise ValueError(
                f"{path}: unexpected tensor {tensor.name!r}; control vectors hold 'direction.N' (N >= 1, ASCII digits, "
                "no leading zeros)"
            )
        vectors[int(match.group(1)) - 1] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return meta, vectors


def _field(reader, key: str) -> object:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if value.dtype == np.uint8:
        return bytes(value).decode("utf-8")
    return value.item() if value.size == 1 else value.tolist()
