"""``load_model``: a hub id, a local folder, a ``.gguf`` file, ``"default"`` or ``"organism"``, on any backend."""

from __future__ import annotations

from pathlib import Path

import torch

from steering.backends import ENGINES, model_class
from steering.backends.hf import SteeringModel
from steering.backends.hf.loading import load_causal_lm, load_tokenizer
from steering.backends.protocol import Backend
from steering.models.wrap import BACKENDS, wrap_backend


def load_model(
    model_id: str | Path = "default",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    backend: str = "hf",
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    tensor_parallel_size: int = 1,
    **engine_kwargs,
) -> Backend:
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
    from steering.default_model import DEFAULT_NAME, fetch_default_model

    if backend not in (*BACKENDS, *ENGINES):
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join((*BACKENDS, *ENGINES))}")
    if backend not in ENGINES and (engine_kwargs or tensor_parallel_size != 1):
        raise ValueError(
            f"tensor_parallel_size and engine arguments ({', '.join(engine_kwargs) or 'tensor_parallel_size'}) are "
            "for backend='vllm'; for several GPUs with transformers use device='auto'"
        )
    if backend in ENGINES:
        model_class(backend).check_engine_kwargs(engine_kwargs)
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
    tokenizer = load_tokenizer(source, **kwargs)
    if backend in ENGINES:
        engine = model_class(backend).load_engine(
            str(source), name, tokenizer, dtype, tensor_parallel_size, trust_remote_code, kwargs.get("gguf_file"),
            **engine_kwargs,
        )  # fmt: skip
        engine.source = source
        return engine
    model = load_causal_lm(source, dtype, device, **kwargs)
    wrapped = SteeringModel(model, tokenizer, name=name, layers_path=layers_path)
    wrapped = wrap_backend(wrapped, backend)  # as it is for "hf"
    wrapped.source = source / kwargs["gguf_file"] if "gguf_file" in kwargs else source
    return wrapped
