"""nnsight 0.8 backend: steer and capture by editing decoder-block outputs inside an nnsight trace.

Inside a trace the code reads the decoder stack's inputs (the attention mask, position ids and KV cache nnsight
actually passes) into a ``PositionTracker``, then rewrites ``<layers>[L].output`` with ``Intervention.apply``.
Generation steps through a bounded ``tracer.iter[:max_new_tokens]`` (an open-ended loop can spin for minutes).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from steering.hooks.capture import At, select_rows
from steering.hooks.layers import find_layers, find_layers_path, hidden_of, replace_hidden, resolve_layers
from steering.hooks.norms import counted, mean_norm, token_norms
from steering.hooks.plan import Plan
from steering.hooks.positions import PositionTracker

# Model inputs of one row each; every other keyword of a generate call is a generation option.
INPUT_KEYS = ("input_ids", "attention_mask", "inputs_embeds", "position_ids")


def is_nnsight(obj: object) -> bool:
    """True for a top-level nnsight model (``TransformersModel``, ``LanguageModel``, ``NNsight``), not a submodule."""
    module = sys.modules.get("nnsight")
    cls = getattr(module, "Envoy", None) if module is not None else None
    return cls is not None and isinstance(obj, cls) and getattr(obj, "_parent", None) is None


def hf_model(lm) -> nn.Module:
    """The torch module an nnsight model wraps."""
    return lm._module


def wrap(model: nn.Module, tokenizer=None) -> object:
    """An nnsight ``TransformersModel`` around a loaded causal LM (the tokenizer is copied: nnsight re-pads it)."""
    try:
        from nnsight.modeling.transformers import TransformersModel
    except ImportError as err:  # pragma: no cover - nnsight is a dependency
        raise ValueError("backend='nnsight' needs nnsight>=0.8: pip install nnsight") from err
    tok = copy.deepcopy(tokenizer) if tokenizer is not None else None
    return TransformersModel(model, tokenizer=tok, task="text-generation")


def _envoy(lm, path: str):
    envoy = lm
    for part in path.split("."):
        if part:
            envoy = getattr(envoy, part)
    return envoy


def _envoys(lm, layers_path: str | None) -> tuple[object, object, int]:
    """(stack envoy, layer-list envoy, number of layers) for the decoder blocks of ``lm``."""
    path = find_layers_path(hf_model(lm), layers_path)
    n = len(find_layers(hf_model(lm), path))
    return _envoy(lm, path.rpartition(".")[0]), _envoy(lm, path), n


def _read_positions(lm, stack, trackers: Sequence[PositionTracker]) -> None:
    """Feed the inputs of the current forward call to each tracker (outer model first: its 2-D mask)."""
    if not trackers:
        return
    if stack is not lm:
        args, kwargs = lm.inputs
        for tracker in trackers:
            tracker._remember_mask(None, args, kwargs)
    args, kwargs = stack.inputs
    for tracker in trackers:
        tracker(None, args, kwargs)


def _edit_layers(blocks, plans: Sequence[Plan], upto: int | None = None, capture: tuple | None = None) -> None:
    """Rewrite each planned layer's output in ascending order; ``capture`` = (layers, dict, tracker, At) stores
    the (edited) residual stream of those layers at those positions."""
    wanted = sorted({i for plan in plans for i in plan.layers} | set(capture[0] if capture else ()))
    for i in wanted:
        if upto is not None and i > upto:
            break
        block = blocks[i]
        output = block.output
        hidden = hidden_of(output)
        edited = hidden
        for plan in plans:
            edited = plan.edit(i, edited)
        if plans and i in {j for plan in plans for j in plan.layers}:
            block.output = replace_hidden(output, edited)  # also after an in-place edit: nnsight tracks assignments
        if capture and i in capture[0]:
            capture[1][i] = select_rows(edited, capture[2].positions, capture[3])


def _trace_kwargs(remote: bool) -> dict:
    if not remote:
        return {}
    import nnsight

    for module in ("steering.hooks", __name__):  # ship our hook code by value to the remote server
        nnsight.register(module)
    return {"remote": True}


def forward(lm, plans: Sequence[Plan], args: tuple, kwargs: dict, layers_path: str | None = None, remote=False):
    """One forward of ``lm`` on ``args`` / ``kwargs`` (as the model takes them) with ``plans`` applied."""
    import nnsight

    stack, blocks, _ = _envoys(lm, layers_path)
    with lm.trace(*args, **kwargs, **_trace_kwargs(remote)):
        _read_positions(lm, stack, [plan.tracker for plan in plans])
        _edit_layers(blocks, plans)
        output = nnsight.save(lm.output)
    return output


def generate(lm, plans: Sequence[Plan], args: tuple, kwargs: dict, layers_path: str | None = None, remote=False):
    """``model.generate(*args, **kwargs)`` through nnsight with ``plans`` applied at every step; returns the ids
    [B, T + new]. Steps are bounded by ``max_new_tokens``; a run that stops early (every row at EOS) is fine."""
    import nnsight

    inputs = {k: kwargs.pop(k) for k in INPUT_KEYS if k in kwargs}
    if args:
        inputs.setdefault("input_ids", args[0])
    steps = kwargs.get("max_new_tokens") or getattr(
        getattr(hf_model(lm), "generation_config", None), "max_new_tokens", None
    )
    if not steps:
        raise ValueError("nnsight generation needs a bound on the steps: pass max_new_tokens=N")
    stack, blocks, _ = _envoys(lm, layers_path)
    trackers = [plan.tracker for plan in plans]
    with warnings.catch_warnings():
        # nnsight warns when the step loop asks for more steps than a run made (all rows hit EOS): expected here.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with lm.generate(**kwargs, **_trace_kwargs(remote)) as tracer:
            with tracer.invoke(inputs):
                if plans:
                    for _ in tracer.iter[:steps]:
                        _read_positions(lm, stack, trackers)
                        _edit_layers(blocks, plans)
            with tracer.invoke():
                ids = nnsight.save(tracer.result)
    return ids


def capture(
    lm,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    layers: Sequence[int],
    at: str | int | Sequence | Tensor | At = "last",
    layers_path: str | None = None,
    plans: Sequence[Plan] = (),
    remote: bool = False,
) -> dict[int, Tensor]:
    """Residual stream ``{layer: [B, d]}`` (or ``[B, k, d]``) at decoder-block outputs, read inside one trace that
    stops after the deepest requested layer; active ``plans`` are applied first, as on plain transformers."""
    import nnsight

    stack, blocks, n = _envoys(lm, layers_path)
    wanted = resolve_layers(layers, n)
    read_at = At.parse(at, input_ids.shape[0])
    tracker = PositionTracker()
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    trackers = [tracker, *(plan.tracker for plan in plans)]
    with torch.no_grad(), lm.trace(inputs, use_cache=False, **_trace_kwargs(remote)) as tracer:
        saved = nnsight.save({})
        _read_positions(lm, stack, trackers)
        _edit_layers(blocks, plans, upto=wanted[-1], capture=(wanted, saved, tracker, read_at))
        tracer.stop()
    return {int(i): saved[int(i) % n] for i in layers}


def mean_norms(
    lm, input_ids: Tensor, attention_mask: Tensor | None, layers_path: str | None = None, remote: bool = False
) -> Tensor:
    """Mean residual norm of each decoder block's output [n_layers] (``steering.hooks.norms``), read in one
    trace."""
    import nnsight

    stack, blocks, n = _envoys(lm, layers_path)
    tracker = PositionTracker()
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    with torch.no_grad(), lm.trace(inputs, use_cache=False, **_trace_kwargs(remote)):
        norms = nnsight.save([])
        _read_positions(lm, stack, [tracker])
        for i in range(n):
            norms.append(mean_norm(token_norms(hidden_of(blocks[i].output)), counted(tracker.positions)).cpu())
    return torch.stack(norms)
