"""Model fingerprints: which exact model (weights, config, tokenizer) computed a run's rows.

A sweep records ``model_fingerprint(model)`` among its inputs, so resuming a run with a model that changed under the
same name (a local folder whose ``model.norm.weight`` was rescaled, another revision, another chat template) is
refused instead of mixing rows from two models.

- A model loaded from files (``load_model``: a local folder, a ``.gguf`` file, the default model, a hub id from the
  local Hugging Face cache) is fingerprinted by its files: every top-level file of the folder (weights, config,
  tokenizer, chat template, remote code; not READMEs or licences). Each file is hashed in full, once: the digest is
  cached under ``steering_home()`` keyed by the file's real path, size, mtime, ctime and inode, so a 140 GB folder is
  read on its first run only (minutes), and any write to a file (which always changes its ctime, even if its mtime
  is set back) makes it be read again. Files changed in the last ``RACY_SECONDS`` are not cached (a second change
  within one timestamp tick could otherwise go unseen).
- A model built in memory is fingerprinted by its parameters and buffers (bytes, dtypes, shapes), its config and
  its tokenizer. The two kinds differ for the same model: resume a run the way it was started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("steering")

CACHE_FILE = "file-hashes.json"
RACY_SECONDS = 2.0
_SKIPPED_PREFIXES = ("readme", "license", "licence", "notice", "copying")
_LOCK = threading.Lock()


def model_fingerprint(model: Any) -> str:
    """sha256 hex of what determines ``model``'s numbers: its files when it was loaded from files (``source``),
    else its parameters, config and tokenizer in memory."""
    source = getattr(model, "source", None)
    if source is None and hasattr(model, "llm"):  # a vLLM engine built by hand: the folder it loaded
        source = getattr(getattr(model.llm.llm_engine, "model_config", None), "model", None)
    if source is not None:
        path = Path(str(source)).expanduser()
        if path.is_file():
            return file_fingerprint(path)
        if path.is_dir():
            return folder_fingerprint(path)
        snapshot = _hub_snapshot(str(source))
        if snapshot is not None:
            return folder_fingerprint(snapshot)
    module = _module(model)
    if module is None:
        raise ValueError(
            f"cannot fingerprint model {getattr(model, 'name', model)!r}: its files cannot be found and it has no "
            "weights in this process; load it with load_model(<local folder or cached hub id>)"
        )
    return memory_fingerprint(module, getattr(model, "tokenizer", None))


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 hex over the names and content digests of ``folder``'s top-level files (see the module docstring)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if _counts(path):
            digest.update(f"{path.name}\0{cached_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 hex of one model file (a ``.gguf``), cached like a folder's files."""
    return cached_file_sha256(Path(path))


def memory_fingerprint(module: Any, tokenizer: Any = None) -> str:
    """sha256 hex of a torch module's parameters and buffers (name, dtype, shape, bytes), its ``config`` and
    ``tokenizer``: everything that sets the numbers of a model built in memory."""
    import torch

    digest = hashlib.sha256()
    digest.update(_config_text(getattr(module, "config", None)).encode())
    digest.update(_tokenizer_text(tokenizer).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ValueError(f"cannot fingerprint the model: {name} has no data here (meta device / offloaded)")
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- files ------------------------------------------------------------------------------------------------------
def _counts(path: Path) -> bool:
    """Whether a folder entry can change the model's numbers: files, not hidden ones, READMEs or licences."""
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and not name.startswith(_SKIPPED_PREFIXES)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file_sha256(path: Path) -> str:
    """The sha256 hex of ``path``'s bytes, read once per content (see the module docstring for the cache key)."""
    real = path.resolve()
    info = real.stat()
    stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
    key = str(real)
    entry = _load_cache().get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    if info.st_size > 1 << 30:
        log.info("hashing %s (%.1f GB) once to fingerprint the model", real, info.st_size / 1e9)
    digest = _hash_file(real)
    if time.time() - max(info.st_mtime_ns, info.st_ctime_ns) / 1e9 > RACY_SECONDS:
        _store(key, {"stamp": stamp, "sha256": digest})
    return digest


def _cache_path() -> Path:
    from steering.default_model import steering_home

    return steering_home() / CACHE_FILE


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(key: str, entry: dict) -> None:
    """Add one entry to the cache file (atomic replace; a cache that cannot be written is only slower)."""
    path = _cache_path()
    with _LOCK:
        cache = _load_cache()
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".file-hashes-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(cache, handle)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("could not write the file-hash cache %s: %s", path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache folder of a hub id (the revision that was loaded), if it is there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not cached: fall back to the weights in memory
        return None


# ---- in memory --------------------------------------------------------------------------------------------------
def _module(model: Any) -> Any:
    import torch

    for candidate in (getattr(model, "model", None), model):
        candidate = getattr(candidate, "module", candidate)  # nnsight's traced model wraps the torch module
        if isinstance(candidate, torch.nn.Module):
            return candidate
    return None


def _config_text(config: Any) -> str:
    """The config as canonical JSON, without bookkeeping (paths, versions, private runtime choices)."""
    if config is None:
        return ""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return json.dumps(data, sort_keys=True, default=str)


def _tokenizer_text(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, merges, normalisation, special tokens and chat template as canonical JSON."""
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set per call by transformers; not part of the tokenizer
            model.pop(transient, None)
    else:
        model = sorted(tokenizer.get_vocab().items())
    parts = {
        "tokenizer": model,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return json.dumps(parts, sort_keys=True, default=str)
