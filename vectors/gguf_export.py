"""Export a ``VectorSet`` as a llama.cpp control vector (GGUF), so the vectors run in llama.cpp too.

Layout: ``general.architecture = "controlvector"``, ``controlvector.model_hint``, ``controlvector.layer_count``,
tensors ``direction.{layer + 1}`` float32 [d_model] (llama.cpp numbers control-vector layers from 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .gguf_read import ARCH, read_gguf
from .vectorset import VectorSet

__all__ = ["ARCH", "export_gguf", "read_gguf"]


def export_gguf(vectorset: VectorSet, path: str | Path, model_hint: str | None = None) -> Path:
    """Write ``vectorset`` to ``path`` as a control-vector GGUF; ``model_hint`` defaults to the set's model name.

    Use it in llama.cpp with ``--control-vector-scaled FILE COEF`` (and ``--control-vector-layer-range``).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    try:
        writer.add_string(f"{ARCH}.model_hint", model_hint or vectorset.model)
        writer.add_uint32(f"{ARCH}.layer_count", len(vectorset))
        for layer in vectorset.layers:
            writer.add_tensor(f"direction.{layer + 1}", vectorset[layer].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
