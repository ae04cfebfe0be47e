"""``VectorSet``: one steering vector per layer plus the metadata that says where it came from; safetensors files.

File format ``steering.vectors/1``: tensors ``layers.{i}`` float32 [d_model] (``i`` a plain ASCII decimal, no
leading zeros, so no two names can mean one layer); string metadata ``format``, ``model``, ``driver``, ``method``,
``position``, ``normalized``, ``d_model``, ``n_pairs``, ``dataset_sha256``, ``version``. Never pickle. ``load`` also
imports llama.cpp control-vector GGUF files (``general.architecture = controlvector``, tensors ``direction.N``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

FORMAT = "steering.vectors/1"
LAYER_INDEX = re.compile(r"0|[1-9][0-9]*")
"""A layer index in a tensor name: ASCII digits, no leading zeros (``layers.09`` or ``layers.\u0663`` are refused)."""
GGUF_MAGIC = b"GGUF"
METADATA_KEYS = (
    "format",
    "model",
    "driver",
    "method",
    "position",
    "normalized",
    "d_model",
    "n_pairs",
    "dataset_sha256",
    "version",
)


class VectorTransferWarning(UserWarning):
    """A vector made on one model is applied to another model of the same width (``strict=False``)."""


def package_version() -> str:
    """The installed toolkit version (recorded in every vector file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steering-af")
    except PackageNotFoundError:
        return "0+unknown"


def same_model(a: str, b: str) -> bool:
    """Model names match when their last path component agrees, ignoring case ("org/Name" == "Name")."""

    def key(name: str) -> str:
        return str(name).rstrip("/").rsplit("/", 1)[-1].lower()

    return key(a) == key(b)


@dataclass(eq=False)
class VectorSet:
    """Steering vectors ``{layer: [d_model]}`` (float32, CPU) for one driver of one model, with provenance.

    ``quality`` (optional) is the per-layer held-out table from ``layer_quality``; it is not written to files.
    """

    driver: str
    model: str
    method: str
    position: str
    normalized: str
    d_model: int
    n_pairs: int
    dataset_sha256: str
    vectors: dict[int, Tensor]
    version: str = field(default_factory=package_version)
    quality: Any = None

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("a VectorSet needs at least one layer's vector")
        clean = {}
        for layer, vector in sorted(self.vectors.items()):
            vector = torch.as_tensor(vector).detach().to("cpu", torch.float32).contiguous()
            if vector.shape != (self.d_model,):
                raise ValueError(f"vector of layer {layer} has shape {tuple(vector.shape)}; expected [{self.d_model}]")
            if not torch.isfinite(vector).all():
                raise ValueError(f"vector of layer {layer} contains NaN or inf; recompute it")
            clean[int(layer)] = vector
        self.vectors = clean

    def __repr__(self) -> str:
        return (
            f"VectorSet(driver={self.driver!r}, model={self.model!r}, method={self.method!r}, "
            f"layers={len(self.vectors)}, d_model={self.d_model}, normalized={self.normalized!r})"
        )

    # ---- access ------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layers that have a vector, ascending."""
        return sorted(self.vectors)

    def __getitem__(self, layer: int) -> Tensor:
        """The vector of ``layer`` [d_model]."""
        if layer not in self.vectors:
            raise KeyError(f"no vector for layer {layer}; this set has layers {self.layers}")
        return self.vectors[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self.vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's vector."""
        return {layer: float(v.norm()) for layer, v in self.vectors.items()}

    def metadata(self) -> dict[str, str]:
        """The string metadata written to the file."""
        return {
            "format": FORMAT,
            "model": str(self.model),
            "driver": str(self.driver),
            "method": str(self.method),
            "position": str(self.position),
            "normalized": str(self.normalized),
            "d_model": str(int(self.d_model)),
            "n_pairs": str(int(self.n_pairs)),
            "dataset_sha256": str(self.dataset_sha256),
            "version": str(self.version),
        }

    def best_layers(self, k: int = 1) -> list[int]:
        """The ``k`` layers with the best held-out quality (needs ``self.quality`` from ``layer_quality``)."""
        if self.quality is None:
            raise ValueError(
                "this VectorSet has no quality table; set vs.quality = layer_quality(model, vs, test_pairs)"
            )
        return best_layers(self.quality, k)

    # ---- controls ----------------------------------------------------------------------------------------
    def random_like(self, seed: int = 0) -> VectorSet:
        """Random Gaussian directions with the same per-layer norms (a control); driver ``random-{seed}``."""
        generator = torch.Generator().manual_seed(int(seed))
        vectors = {}
        for layer in self.layers:
            direction = torch.randn(self.d_model, generator=generator, dtype=torch.float64)
            vectors[layer] = (direction / direction.norm() * float(self.vectors[layer].norm())).float()
        return replace(self, driver=f"random-{seed}", vectors=vectors, quality=None)

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors ``layers.{i}`` float32 [d_model] + string metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{layer}": self.vectors[layer].clone() for layer in self.layers}
        save_file(tensors, str(path), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, strict: bool = True) -> VectorSet:
        """Read a vector file; with ``model`` (anything with ``d_model`` and ``name``), check it fits that model.

        A different ``d_model`` is always an error; a different model name is an error when ``strict``, else a
        ``VectorTransferWarning``. A llama.cpp control-vector GGUF is imported (``from_gguf``); its model hint is
        an architecture rather than a model name, so for it a different name is only a warning.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"vector file {path} does not exist; check the path")
        with open(path, "rb") as handle:
            if handle.read(4) == GGUF_MAGIC:
                vs = cls.from_gguf(path)
                if model is not None:
                    vs.check_model(model, strict=False)
                return vs
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise ValueError(
                f"{path} is not a readable safetensors file ({exc}); pass a file written by save()"
            ) from None
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}; this is not a "
                "steering vector file (write one with VectorSet.save)"
            )
        missing = [k for k in METADATA_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{path}: metadata lacks {', '.join(missing)}; re-save the vectors with VectorSet.save")
        try:
            d_model, n_pairs = int(meta["d_model"]), int(meta["n_pairs"])
        except ValueError:
            raise ValueError(f"{path}: d_model / n_pairs are not integers; the file is corrupt") from None
        vectors = {}
        for name, tensor in tensors.items():
            prefix, _, index = name.partition(".")
            if prefix != "layers" or not LAYER_INDEX.fullmatch(index):
                raise ValueError(
                    f"{path}: unexpected tensor {name!r}; vector files hold only 'layers.{{i}}' with i a plain decimal "
                    "index (ASCII digits, no leading zeros)"
                )
            if tensor.dtype != torch.float32 or tensor.shape != (d_model,):
                raise ValueError(
                    f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected float32 [{d_model}]"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: tensor {name} contains NaN or inf; the file is corrupt, re-extract it")
            vectors[int(index)] = tensor
        if not vectors:
            raise ValueError(f"{path}: no 'layers.{{i}}' tensors; the file holds no vectors")
        vs = cls(
            driver=meta["driver"],
            model=meta["model"],
            method=meta["method"],
            position=meta["position"],
            normalized=meta["normalized"],
            d_model=d_model,
            n_pairs=n_pairs,
            dataset_sha256=meta["dataset_sha256"],
            vectors=vectors,
            version=meta["version"],
        )
        if model is not None:
            vs.check_model(model, strict=strict)
        return vs

    @classmethod
    def from_gguf(cls, path: str | Path) -> VectorSet:
        """Import a llama.cpp control vector (GGUF: ``general.architecture = controlvector``, tensors
        ``direction.N``, N from 1; written by llama.cpp's cvector-generator, repeng or ``export_gguf``). The driver
        is the file name, the model its ``controlvector.model_hint``, ``dataset_sha256`` the file's own hash."""
        from .datasets import file_sha256
        from .gguf_read import read_gguf

        path = Path(path)
        meta, directions = read_gguf(path)
        if not directions:
            raise ValueError(f"{path}: the control vector holds no 'direction.N' tensors")
        sizes = {int(v.shape[0]) for v in directions.values()}
        if len(sizes) != 1:
            raise ValueError(f"{path}: the control vector's directions have different sizes {sorted(sizes)}")
        return cls(
            driver=path.stem,
            model=str(meta.get("controlvector.model_hint") or "unknown"),
            method="gguf-import",
            position="unknown",
            normalized="none",
            d_model=sizes.pop(),
            n_pairs=0,
            dataset_sha256=file_sha256(path),
            vectors={layer: torch.from_numpy(vector.copy()) for layer, vector in directions.items()},
        )

    def check_model(self, model: Any, strict: bool = True) -> None:
        """Raise if these vectors cannot apply to ``model`` (d_model; model name when ``strict``)."""
        d_model = getattr(model, "d_model", None)
        if d_model is not None and int(d_model) != self.d_model:
            raise ValueError(
                f"vectors have d_model={self.d_model} but model {getattr(model, 'name', '?')!r} has d_model={d_model}; "
                f"use vectors extracted from a model of the same width (these come from {self.model!r})"
            )
        n_layers = getattr(model, "n_layers", None)
        if n_layers is not None and self.layers[-1] >= int(n_layers):
            raise ValueError(
                f"vectors go up to layer {self.layers[-1]} but the model has {n_layers} layers; use a matching model"
            )
        name = getattr(model, "name", None)
        if name is not None and not same_model(name, self.model):
            message = (
                f"vectors were extracted from {self.model!r} but are applied to {name!r}; pass strict=False to "
                "allow the transfer"
            )
            if strict:
                raise ValueError(message)
            warnings.warn(
                message.replace(
                    "pass strict=False to allow", "silence with a warnings filter on VectorTransferWarning"
                ),
                VectorTransferWarning,
                stacklevel=3,
            )


def best_layers(quality: Any, k: int = 1) -> list[int]:
    """The ``k`` best layers of a quality table: highest accuracy, ties broken by separation."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    df = pd.DataFrame(quality)
    missing = {"layer", "accuracy", "separation"} - set(df.columns)
    if missing:
        raise ValueError(f"the quality table lacks {', '.join(sorted(missing))}; build it with layer_quality(...)")
    ranked = df.sort_values(["accuracy", "separation", "layer"], ascending=[False, False, True], kind="stable")
    return [int(x) for x in ranked["layer"].head(k)]
