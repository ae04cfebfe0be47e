"""``load_model``: a hub id, a local folder, a ``.gguf`` file, ``"default"`` or ``"organism"``, on any backend."""

from __future__ import annotations

from pathlib import Path

import torch

from steering.backends import ENGINES
from steering.backends.base import TextModel
from steering.backends.hf import SteeringModel
from steering.models.wrap import BACKENDS, wrap_backend


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'") from None


def load_model(
    model_id: str | Path = "default",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    backend: str = "hf",
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    tensor_parallel_size: int = 1,
    **engine_kwargs,
) -> TextModel:
    """Load a causal LM: a hub id, a local folder, a ``.gguf`` file, ``"default"`` (the offline default model) or
    ``"organism"`` (the default model with the shipped alignment-faking adapter merged: a known positive).

    ``device="auto"`` spreads a large model over the available GPUs (``device_map="auto"``). Remote code runs
    only with ``trust_remote_code=True``.

    ``backend="vllm"`` returns a ``VLLMModel`` on a vLLM engine (``device`` and ``layers_path`` do not apply; vLLM
    places the model): ``tensor_parallel_size`` GPUs, and ``engine_kwargs`` go to ``vllm.LLM`` (e.g.
    ``max_model_len``, ``gpu_memory_utilization``, ``enable_prefix_caching``); arguments set through other
    parameters (``model``, ``dtype``, ``trust_remote_code``, ...) or unknown to vLLM are refused with a ValueError.

    The returned model's ``source`` is what it was loaded from (a folder, a ``.gguf`` file or a hub id): sweeps
    fingerprint those files (``steering.fingerprint``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering.default_model import DEFAULT_NAME, fetch_default_model

    if backend not in (*BACKENDS, *ENGINES):
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join((*BACKENDS, *ENGINES))}")
    if backend not in ENGINES and (engine_kwargs or tensor_parallel_size != 1):
        raise ValueError(
            f"tensor_parallel_size and engine arguments ({', '.join(engine_kwargs) or 'tensor_parallel_size'}) are "
            "for backend='vllm'; for several GPUs with transformers use device='auto'"
        )
    if backend == "vllm":
        _check_vllm_kwargs(engine_kwargs)
    name = str(model_id)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if name == "default":
        source, name = fetch_default_model(), DEFAULT_NAME
    elif name == "organism":
        from steering.organism import ORGANISM_NAME, fetch_organism

        source, name = fetch_organism(), ORGANISM_NAME
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"GGUF file {path} does not exist; check the path")
        source, kwargs["gguf_file"] = path.parent, path.name
    elif Path(name).expanduser().exists():
        source = Path(name).expanduser()
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ValueError(
            f"model folder {Path(name).expanduser()} does not exist; pass an existing folder, a .gguf file, a hub id "
            "such as org/name, 'default' or 'organism'"
        )
    else:
        source = name
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if backend == "vllm":
        if "gguf_file" in kwargs:
            raise ValueError("the vLLM backend loads a model folder or hub id, not a .gguf file; use backend='hf'")
        from steering.backends.vllm import load_vllm

        engine = load_vllm(
            str(source), name, tokenizer, dtype, tensor_parallel_size, trust_remote_code, **engine_kwargs
        )  # fmt: skip
        engine.source = source
        return engine
    model_kwargs = dict(kwargs, dtype=_resolve_dtype(dtype))
    if device == "auto":
        model_kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    wrapped = SteeringModel(model, tokenizer, name=name, layers_path=layers_path)
    wrapped = wrapped if backend == "hf" else wrap_backend(wrapped, backend)
    wrapped.source = source / kwargs["gguf_file"] if "gguf_file" in kwargs else source
    return wrapped


def _check_vllm_kwargs(engine_kwargs: dict) -> None:
    """Refuse engine arguments that other parameters set, or that this vLLM does not know (a ValueError naming the
    key, before the tokenizer or the engine loads; vLLM itself raised a TypeError for an unknown one)."""
    import dataclasses

    from steering.engine_args import RESERVED_ENGINE_KEYS

    for key in engine_kwargs:
        if key in RESERVED_ENGINE_KEYS:
            raise ValueError(
                f"engine argument {key!r} cannot be set here; use load_model's own parameters (model_id, dtype, "
                "tensor_parallel_size, trust_remote_code)"
            )
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return  # load_vllm says how to install vLLM
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(engine_kwargs) - known)
    if unknown:
        raise ValueError(f"vLLM has no engine argument {unknown[0]!r}; see vllm.engine.arg_utils.EngineArgs")
