"""Loading a Hugging Face causal LM and its tokenizer (``load_model`` calls these for every backend: the engines
take the tokenizer, the in-process backends the module too)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'") from None


def load_tokenizer(source: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained(source, **kwargs)`` (``trust_remote_code``, ``gguf_file``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_causal_lm(
    source: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", **kwargs
) -> nn.Module:
    """The causal LM at ``source`` in eval mode, on ``device`` (``"auto"``: spread over the GPUs with
    ``device_map="auto"``); ``kwargs`` go to ``from_pretrained`` (``trust_remote_code``, ``gguf_file``)."""
    from transformers import AutoModelForCausalLM

    model_kwargs = dict(kwargs, dtype=resolve_dtype(dtype))
    if device == "auto":
        model_kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return model


def save_pretrained(folder: str | Path, model: nn.Module, tokenizer) -> None:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
