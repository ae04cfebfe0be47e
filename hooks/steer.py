"""Steer a transformers model: a context manager that drives a ``Plan`` through PyTorch forward hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .intervention import Intervention
from .layers import find_layers, find_stack, model_d_model
from .plan import Plan, steer_module
from .positions import PositionTracker, RowLayout


@contextmanager
def steer(
    model: nn.Module,
    interventions: Intervention | Sequence[Intervention],
    layout: RowLayout | None = None,
    layers_path: str | None = None,
) -> Iterator[PositionTracker]:
    """Apply ``interventions`` to every forward pass inside the block; all hooks are removed on exit or error.

    Yields the position tracker (``.positions`` [B, T]: row positions of the last call; ``.layout``). Only forward
    passes run by the thread (or asyncio task) that entered the block are steered. Explicit position ranges that
    touched no token in any forward call raise a ``ValueError`` at the end of the block (nothing was steered).
    """
    layers = find_layers(model, layers_path)
    plan = Plan(interventions, len(layers), model_d_model(model), layout)
    with drive(model, plan, layers, find_stack(model, layers_path)) as tracker:
        yield tracker


@contextmanager
def drive(model: nn.Module, plan: Plan, layers: Sequence[nn.Module], stack: nn.Module) -> Iterator[PositionTracker]:
    """Drive ``plan`` through forward hooks on ``layers`` (the decoder blocks of ``model``; ``stack`` receives the
    mask, position ids and KV cache) for the duration of the block: the one implementation behind ``steer`` and
    every model object that already knows its blocks. Yields the plan's position tracker."""
    handles = steer_module(model, plan, layers, stack)
    try:
        yield plan.tracker
    finally:
        for handle in handles:
            handle.remove()
    plan.check_reached()
