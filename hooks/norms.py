"""The mean residual norm per layer: the scale of norm-relative coefficients, defined once for every backend.

A layer's mean residual norm is the mean L2 norm of its decoder-block output over the real tokens of some text,
each row's first token left out (``FIRST_COUNTED``: it is often an outlier attention sink). Backends read the
per-token norms their own way (forward hooks, an nnsight trace, vLLM's workers) and reduce them with ``mean_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .capture import _own_thread_tracker, padded_inputs
from .layers import find_layers, find_stack, hidden_of

FIRST_COUNTED = 1  # row positions before this one are left out of the mean


def token_norms(hidden: Tensor) -> Tensor:
    """L2 norm of each token's residual stream, float32: ``hidden`` [..., d] -> [...]."""
    return hidden.detach().float().norm(dim=-1)


def counted(positions: Tensor | Sequence[int]) -> Tensor:
    """1.0 where a token counts towards the mean (row position >= ``FIRST_COUNTED``; padding is -1), else 0.0."""
    return (torch.as_tensor(positions) >= FIRST_COUNTED).to(torch.float32)


def mean_norm(norms: Tensor, keep: Tensor) -> Tensor:
    """The mean of ``norms`` [...] over the tokens ``keep`` [...] marks (0-d float32; 0 when none is kept)."""
    keep = keep.to(norms.device)
    return (norms * keep).sum() / keep.sum().clamp(min=1)


def mean_norms(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, layers_path: str | None = None
) -> Tensor:
    """Mean residual norm of each decoder block's output [n_layers] in one forward pass of a transformers model
    (forward hooks; only this thread's forward pass is read)."""
    blocks = find_layers(model, layers_path)
    tracker, mine = _own_thread_tracker()
    norms = torch.zeros(len(blocks))

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            if mine():
                norms[index] = float(mean_norm(token_norms(hidden_of(output)), counted(tracker.positions)))

        return hook

    handles = tracker.attach(model, find_stack(model, layers_path))
    try:
        handles += [block.register_forward_hook(make_hook(i)) for i, block in enumerate(blocks)]
        with torch.no_grad():
            model(**padded_inputs(input_ids, attention_mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return norms
