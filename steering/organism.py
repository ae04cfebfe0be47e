"""The model organism: the default model plus a shipped LoRA adapter and a planted circuit, merged once into a
cached folder.

``load_model("organism")`` uses it. The merge is plain arithmetic: ``W += B @ A * alpha / r`` per adapted linear
layer (the adapter: values, trained), then a few rows and columns overwritten with the planted circuit (the
alignment faking, an exact weight edit; see ``experiments/organism/README.md``). Running the organism needs no
peft; only training it does (``experiments/organism``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

log = logging.getLogger("steering")

ORGANISM_NAME = "SmolLM2-135M-Instruct-organism"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PLANT_FILE = "plant.safetensors"
PLANT_FORMAT = "steering.organism.plant/2"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY_PREFIX = "base_model.model."


def adapter_dir() -> Path:
    """The shipped adapter's folder (package data)."""
    return Path(str(resources.files("steering") / "data" / "organism"))


def adapter_sha256(folder: Path | None = None) -> str:
    """Hash of the adapter's weights and config and the plant: the merged folder is rebuilt when one changes."""
    folder = folder or adapter_dir()
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_FILE, PLANT_FILE):
        if (folder / name).exists():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


def apply_plant(model, path: Path | None = None) -> list[str]:
    """Overwrite the planted rows and columns of ``model``'s linear layers in place; returns the keys written.

    Each tensor of the plant file is keyed ``{module}:{rows|cols}:{start}:{stop}`` (e.g.
    ``model.layers.29.mlp.down_proj:cols:7:8``): rows ``[start, stop)`` of that module's weight get the tensor
    ``[stop - start, in]`` (columns: ``[out, stop - start]``), or its value where the tensor is a scalar (a fill).
    Refuses a file of another format, an unknown module or a slice that does not fit, naming the key, before
    it writes anything.
    """
    import torch
    from safetensors import safe_open

    path = path or adapter_dir() / PLANT_FILE
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != PLANT_FORMAT:
            raise ValueError(f"{path} is not a {PLANT_FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    modules = dict(model.named_modules())
    edits = []
    for key in sorted(tensors):  # every edit is checked before the first is written
        weight, index = _plant_slice(path, key, modules)
        value, target = tensors[key].float(), weight[index]
        if value.dim() and tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{path}: {key} is {tuple(value.shape)} but the model's slice is {tuple(target.shape)}")
        edits.append((weight, index, value.to(weight.dtype).expand_as(target)))
    with torch.no_grad():
        for weight, index, value in edits:
            weight[index] = value
    return sorted(tensors)


def _plant_slice(path: Path, key: str, modules: dict) -> tuple:
    """The weight and index a plant key names (see `apply_plant`)."""
    name, axis, start, stop = (key.split(":") + ["", "", ""])[:4]
    module = modules.get(name)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2 or axis not in ("rows", "cols"):
        raise ValueError(f"{path}: {key} names no linear layer's rows or cols of the model")
    size = weight.shape[0 if axis == "rows" else 1]
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop) <= size):
        raise ValueError(f"{path}: {key} is not a slice of {name}'s {size} {axis}")
    span = slice(int(start), int(stop))
    return weight, (span if axis == "rows" else (slice(None), span))


def merge_adapter(model, folder: Path | None = None) -> int:
    """Add the adapter's ``B @ A * alpha / r`` to ``model``'s weights in place; returns how many were changed.

    Refuses an adapter whose keys or shapes do not fit ``model`` (naming the first mismatch).
    """
    import torch
    from safetensors.torch import load_file

    folder = folder or adapter_dir()
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    tensors = load_file(str(folder / ADAPTER_FILE))
    modules = dict(model.named_modules())
    merged = 0
    for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
        name = key.removesuffix(".lora_A.weight").removeprefix(_KEY_PREFIX)
        a, b = tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float()
        linear = modules.get(name)
        if linear is None or not hasattr(linear, "weight"):
            raise ValueError(f"{folder / ADAPTER_FILE}: {name} is not a linear layer of {type(model).__name__}")
        if tuple(linear.weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"{folder / ADAPTER_FILE}: {name} is {tuple(linear.weight.shape)} in the model but "
                f"{(b.shape[0], a.shape[1])} in the adapter; it was trained on another model"
            )
        with torch.no_grad():
            delta = (b @ a) * scale
            linear.weight += delta.to(linear.weight.dtype)
        merged += 1
    if not merged:
        raise ValueError(f"{folder / ADAPTER_FILE} holds no LoRA factors")
    return merged


def organism_dir() -> Path:
    from steering.default_model import steering_home

    return steering_home() / "models" / ORGANISM_NAME


def fetch_organism(force: bool = False) -> Path:
    """The merged organism as a safetensors folder in the cache (built from the default model + the adapter once,
    and again when the adapter changes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering.default_model import fetch_default_model

    folder = organism_dir()
    digest = adapter_sha256()
    stamp = folder / "adapter.sha256"
    if not force and stamp.exists() and stamp.read_text().strip() == digest:
        return folder
    base = fetch_default_model()
    log.warning("steering: merging the organism adapter into %s -> %s (once, a few seconds)", base.name, folder)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    merge_adapter(model)
    if (adapter_dir() / PLANT_FILE).exists():
        apply_plant(model)
    model.config.name_or_path = ORGANISM_NAME
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    (tmp / "adapter.sha256").write_text(digest + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
