"""Decoder blocks: find them (known paths, structural discovery, explicit override), the one rule for layer
indices, and the residual stream inside a block's output."""

from __future__ import annotations

import operator

from torch import Tensor, nn

# Dotted paths of the decoder-block list in the architectures we test; discovery tries them first.
KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 text, OLMo 2/3, Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrapper (transformers 5)
    "language_model.model.layers",  # older multimodal wrappers
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
    "model.model.layers",  # vLLM's Transformers modeling backend
    "layers",  # a bare decoder stack
)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None


def find_layers_path(model: nn.Module, override: str | None = None) -> str:
    """Dotted path of the decoder-block ``ModuleList``; ``override`` names it explicitly."""
    if override is not None:
        found = _get(model, override)
        if not isinstance(found, nn.ModuleList):
            raise ValueError(
                f"layers_path={override!r} is not a ModuleList on {type(model).__name__}; pass the "
                "dotted path of the decoder blocks, e.g. 'model.layers'"
            )
        return override
    n = _num_layers(model)
    for path in KNOWN_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and (n is None or len(found) == n):
            return path
    # Structural discovery: the largest ModuleList whose length equals the configured number of layers.
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    if candidates:
        return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))[0]
    raise ValueError(
        f"could not find the decoder blocks of {type(model).__name__}; pass layers_path='<dotted path to the "
        "ModuleList of decoder blocks>' (e.g. 'model.layers')"
    )


def find_layers(model: nn.Module, override: str | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model`` (a ``ModuleList``), in order."""
    return _get(model, find_layers_path(model, override))


def find_stack(model: nn.Module, override: str | None = None) -> nn.Module:
    """The module that owns the decoder blocks (it receives ``attention_mask`` / ``position_ids``)."""
    path = find_layers_path(model, override)
    parent = path.rpartition(".")[0]
    return _get(model, parent) if parent else model


def num_layers(model: nn.Module) -> int | None:
    """``num_hidden_layers`` from the model config (text config for multimodal wrappers)."""
    return _num_layers(model)


def resolve_layer(layer: int, n_layers: int) -> int:
    """The one layer rule: ``0..n-1`` from the embedding output, or ``-n..-1`` from the end; returns ``0..n-1``."""
    try:
        index = operator.index(layer)  # ints and integer numpy / torch scalars; not floats or strings
    except TypeError:
        index = None
    if index is None or isinstance(layer, bool):
        raise ValueError(f"layer {layer!r} is not an integer; pass a layer index such as 12")
    if not -n_layers <= index < n_layers:
        raise ValueError(
            f"layer {index} is out of range: the model has {n_layers} layers (0..{n_layers - 1}, or "
            f"-{n_layers}..-1 from the end)"
        )
    return index % n_layers


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Several layers under ``resolve_layer``'s rule: ``"all"``, an int, ``"3,5,-1"`` or ints -> sorted, unique."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers))
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"layers={layers!r} is not understood; pass 'all', an int or a list like '3,5,7'"
            ) from None
    elif isinstance(layers, int):
        layers = [layers]
    out = sorted({resolve_layer(layer, n_layers) for layer in layers})
    if not out:
        raise ValueError("no layers requested; pass 'all' or at least one layer index")
    return out


def hidden_of(output: Tensor | tuple) -> Tensor:
    """The residual stream [B, T, d] in a decoder block's output (transformers 5 returns a tensor, older a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Tensor | tuple, hidden: Tensor) -> Tensor | tuple:
    """A decoder block's output with its residual stream replaced by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def model_d_model(model: nn.Module) -> int | None:
    """Residual-stream width from the model config (text config for multimodal wrappers)."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None
