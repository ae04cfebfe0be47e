"""Find the decoder blocks of a causal LM: structural discovery, known paths, explicit override."""

from __future__ import annotations

from torch import nn

# Dotted paths of the decoder-block list in the architectures we test; discovery tries them first.
KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 text, OLMo 2/3, Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrapper (transformers 5)
    "language_model.model.layers",  # older multimodal wrappers
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
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
