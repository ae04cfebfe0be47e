"""Readouts: what the residual stream says along chosen directions, recorded during a forward pass someone else
runs (a scoring pass), so reading costs no second pass.

``read_last(blocks, directions)`` is a context manager: while it is active, every forward call records, for each
layer ``L`` in ``directions``, the decoder block's output at the **last column** (the answer position of a
left-padded batch) projected on the rows of ``directions[L]`` ([k, d] -> ``[B, k]``), or the whole residual
(``[B, d]``) where ``directions[L]`` is ``None``. Its hooks are registered when it is entered, after any steering
hooks already on the block, so it reads the stream as steered. With ``history=True`` each layer keeps a list, one
entry per forward call: under KV-cache generation, entry ``s >= 1`` is the generated token ``s - 1`` (the token fed
at step ``s``), entry 0 the prompt's last token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .layers import hidden_of


@contextmanager
def read_last(
    blocks: Sequence[nn.Module], directions: Mapping[int, Tensor | None], history: bool = False
) -> Iterator[dict[int, Any]]:
    """Yield a dict that each forward call fills with ``{layer: [B, k] projections}`` (``[B, d]`` for ``None``);
    with ``history``, ``{layer: [[B, k] per forward call]}``.

    ``directions[L]`` must already be on the model's device and dtype (so a hot loop copies nothing). Without
    ``history`` the dict holds the values of the latest forward call. Hooks are removed on exit, also after an
    exception.
    """
    out: dict[int, Any] = {layer: [] for layer in directions} if history else {}

    def make_hook(layer: int, rows: Tensor | None):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            last = hidden_of(output)[:, -1].detach()  # [B, d]
            value = last.clone() if rows is None else last @ rows.T
            if history:
                out[layer].append(value)
            else:
                out[layer] = value

        return hook

    for layer in directions:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"readout layer {layer} is out of range: the model has layers 0..{len(blocks) - 1}")
    handles = [blocks[layer].register_forward_hook(make_hook(layer, rows)) for layer, rows in directions.items()]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()
