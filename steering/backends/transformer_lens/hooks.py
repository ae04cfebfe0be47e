"""TransformerLens 4.x backend: steer and capture through a ``TransformerBridge``'s hook points.

Interventions run as bridge hooks on ``blocks.{L}.hook_resid_post`` (the decoder block's output). The bridge swaps
its block components into the wrapped Hugging Face model in place, so these hooks also fire when that model is
called directly (e.g. by ``model.generate``). Row positions come from a pre-hook on the decoder stack, which sees
the attention mask, position ids and KV cache the bridge actually passes.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from steering.hooks.capture import At, select_rows
from steering.hooks.intervention import Intervention
from steering.hooks.layers import find_layers, find_stack, model_d_model, resolve_layers
from steering.hooks.plan import Plan
from steering.hooks.positions import PositionTracker, RowLayout

RESID_POST = "blocks.{}.hook_resid_post"


def is_bridge(obj: object) -> bool:
    """True for a TransformerLens ``TransformerBridge`` (without importing TransformerLens)."""
    module = sys.modules.get("transformer_lens.model_bridge")
    cls = getattr(module, "TransformerBridge", None) if module is not None else None
    return cls is not None and isinstance(obj, cls)


def hf_model(bridge: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``bridge`` (its blocks are the bridge's components)."""
    return bridge.original_model


def boot(model: nn.Module, tokenizer=None, eager_attention: bool = False) -> nn.Module:
    """Wrap a loaded Hugging Face causal LM in a ``TransformerBridge`` (in place: the bridge takes over its blocks).

    TransformerLens switches the model to eager attention; unless ``eager_attention``, the model's own attention
    implementation is restored afterwards, so logits match plain transformers exactly (eager is only needed for
    the ``attn.hook_pattern`` / ``hook_attn_scores`` hooks). The tokenizer is copied: the bridge normalises its own.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:  # pragma: no cover - transformer-lens is a dependency
        raise ValueError("backend='transformer_lens' needs transformer-lens>=4: pip install transformer-lens") from err
    config = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]  # Gemma3 / OLMo2 built from a config are refused otherwise
    attn = getattr(config, "_attn_implementation", None)
    param = next(model.parameters())
    placed = bool(getattr(model, "hf_device_map", None))
    bridge = TransformerBridge.boot_transformers(
        getattr(config, "name_or_path", None) or type(model).__name__,
        hf_model=model,
        tokenizer=copy.deepcopy(tokenizer) if tokenizer is not None else None,
        device=None if placed else param.device,
        dtype=param.dtype,
    )
    if not eager_attention and attn is not None and getattr(config, "_attn_implementation", None) != attn:
        model.set_attn_implementation(attn)
    alias_cache_kwarg(bridge)
    return bridge


def _cache_alias(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def alias_cache_kwarg(bridge: nn.Module) -> None:
    """Hand TransformerLens attention components the KV cache under the name they read.

    From transformers 5.24 decoder layers pass the cache as ``cache=``; TransformerLens 4.3's attention bridges read
    only ``past_key_values`` and would silently attend to the new tokens alone (logits off by ~0.7 on a tiny Llama).
    """
    for module in bridge.modules():
        if hasattr(module, "_update_kv_cache") and not getattr(module, "_steering_cache_alias", False):
            module.register_forward_pre_hook(_cache_alias, with_kwargs=True)
            module._steering_cache_alias = True


def _group_hook(plan: Plan, layer: int):
    def hook(tensor: Tensor, hook) -> Tensor:
        return plan.edit(layer, tensor) if plan.is_active() else tensor

    return hook


@contextmanager
def steer(
    bridge: nn.Module,
    interventions: Intervention | Sequence[Intervention],
    layout: RowLayout | None = None,
    layers_path: str | None = None,
) -> Iterator[PositionTracker]:
    """Apply ``interventions`` through bridge hooks to every forward inside the block (bridge calls and direct
    calls of its Hugging Face model alike) run by the thread (or asyncio task) that entered it; all hooks are
    removed on exit and on exceptions. Explicit ranges that touched no token raise a ``ValueError`` on exit."""
    model = hf_model(bridge)
    plan = Plan(interventions, len(find_layers(model, layers_path)), model_d_model(model), layout)
    hooks = [(RESID_POST.format(i), _group_hook(plan, i)) for i in plan.layers]
    handles = [plan.scope_hooks(), *plan.tracker.attach(model, find_stack(model, layers_path))]
    try:
        with bridge.hooks(fwd_hooks=hooks):
            yield plan.tracker
    finally:
        for handle in handles:
            handle.remove()
    plan.check_reached()


def capture(
    bridge: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    layers: Sequence[int],
    at: str | int | Sequence | Tensor | At = "last",
    layers_path: str | None = None,
) -> dict[int, Tensor]:
    """Residual stream ``{layer: [B, d]}`` (or ``[B, k, d]``) from ``blocks.{L}.hook_resid_post`` in one bridge
    forward that stops after the deepest requested layer."""
    model = hf_model(bridge)
    wanted = resolve_layers(layers, len(find_layers(model, layers_path)))
    read_at = At.parse(at, input_ids.shape[0])
    tracker = PositionTracker()
    out: dict[int, Tensor] = {}

    def make_hook(index: int):
        def hook(tensor: Tensor, hook) -> None:
            out[index] = select_rows(tensor, tracker.positions, read_at)

        return hook

    handles = tracker.attach(model, find_stack(model, layers_path))
    try:
        with bridge.hooks(fwd_hooks=[(RESID_POST.format(i), make_hook(i)) for i in wanted]), torch.no_grad():
            bridge(
                input_ids,
                attention_mask=attention_mask,
                return_type=None,
                stop_at_layer=wanted[-1] + 1,
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    n = len(find_layers(model, layers_path))
    return {int(i): out[int(i) % n] for i in layers}
