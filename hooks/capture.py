"""Capture the residual stream (decoder-block output) at chosen layers and positions in one forward pass.

Only the selected positions are kept, so memory grows with rows x layers x d_model, never with sequence length.
The forward pass stops after the deepest requested layer.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import find_layers, find_stack, hidden_of, resolve_layers
from .positions import PositionTracker


@dataclass(frozen=True)
class At:
    """Read positions: where capture reads each row, in row positions (index in the row's unpadded tokens).

    ``index`` [B] or [B, k]: explicit positions; negative values count from each row's end (-1 = last real
    token). ``span`` = (start [B], end [B]) half-open: the mean over that span.
    """

    index: Tensor | None = None
    span: tuple[Tensor, Tensor] | None = None

    @classmethod
    def parse(cls, value: str | int | Sequence | Tensor | At, batch: int) -> At:
        if isinstance(value, At):
            return value
        if isinstance(value, str):
            if value == "last":
                return cls(index=torch.full((batch,), -1))
            if value.startswith("last-") and value[5:].isdigit():
                return cls(index=torch.full((batch,), -1 - int(value[5:])))
            raise ValueError(
                f"unknown capture position {value!r}; use 'last', 'last-K', an int, per-row indices or At(span=...)"
            )
        if not isinstance(value, bool) and getattr(value, "ndim", 0) == 0:
            try:  # ints, numpy integers, integer 0-d tensors
                return cls(index=torch.full((batch,), operator.index(value)))
            except TypeError:
                pass
        index = torch.as_tensor(value, dtype=torch.long)
        if index.shape[0] != batch:
            raise ValueError(
                f"capture positions have {index.shape[0]} rows but the batch has {batch}; pass one per row"
            )
        return cls(index=index)

    @classmethod
    def mean(cls, start: Sequence[int] | Tensor, end: Sequence[int] | Tensor) -> At:
        """Mean over row positions ``start[b] <= p < end[b]``."""
        return cls(span=(torch.as_tensor(start, dtype=torch.long), torch.as_tensor(end, dtype=torch.long)))

    # ---- resolution against each row's length: the one definition every backend reads positions by ----------
    def targets(self, lengths: Tensor) -> tuple[Tensor, bool]:
        """Index form: the row position of each read, [B, k] (negative indices counted from each row's end), and
        whether ``index`` had one position per row ([B]: drop the ``k`` axis of what is read). ``lengths`` [B]: real
        tokens per row. Raises a ``ValueError`` for a position outside its row."""
        index = self.index.to(device=lengths.device, dtype=torch.long)
        squeeze = index.dim() == 1
        index = index[:, None] if squeeze else index
        target = torch.where(index < 0, lengths[:, None] + index, index)  # [B, k]
        if bool(((target < 0) | (target >= lengths[:, None])).any()):
            raise ValueError(
                f"capture position out of range for a row of length {int(lengths.min())}; check the indices"
            )
        return target, squeeze

    def bounds(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Span form: each row's half-open ``[start, end)`` clipped to its tokens ``[0, length)``, two [B] tensors.
        Raises a ``ValueError`` when a row's span covers no token."""
        start, end = (x.to(device=lengths.device, dtype=torch.long) for x in self.span)
        start, end = start.clamp(min=0), torch.minimum(end, lengths)
        if bool((end <= start).any()):
            raise ValueError("a capture span covers no tokens in some row; check start < end within the row length")
        return start, end


def padded_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
    """Forward kwargs with ``position_ids`` from the mask, so a padded row sees the positions it has alone
    (absolute-position models such as GPT-2 otherwise shift left-padded rows)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask is not None:
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


class _Stop(Exception):
    """Raised by the last capture hook to skip the rest of the forward pass."""


@dataclass(frozen=True)
class ReadIndex:
    """Where ``At`` reads in one forward call, resolved once and shared by every captured layer: a [B, T] weight
    (spans, already divided by each row's count) or the (row [B, 1], column [B, k]) indices of the tokens to read."""

    weight: Tensor | None = None
    rows: Tensor | None = None
    columns: Tensor | None = None
    squeeze: bool = False

    @classmethod
    def resolve(cls, pos: Tensor, at: At) -> ReadIndex:
        """From row positions ``pos`` [B, T] (-1 = padding); checks the positions exist (one host sync)."""
        lengths = pos.max(dim=1).values + 1  # [B] real tokens per row
        if at.span is not None:
            start, end = at.bounds(lengths)
            weight = ((pos >= start[:, None]) & (pos < end[:, None])).float()
            return cls(weight=weight / weight.sum(dim=1, keepdim=True))
        target, squeeze = at.targets(lengths)
        columns = (pos[:, None, :] == target[:, :, None]).to(torch.int8).argmax(dim=-1)  # [B, k]
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        return cls(rows=rows, columns=columns, squeeze=squeeze)

    def gather(self, hidden: Tensor) -> Tensor:
        """[B, d] (or [B, k, d]) from ``hidden`` [B, T, d], detached."""
        hidden = hidden.detach()
        if self.weight is not None:
            return (self.weight.to(hidden.device, hidden.dtype)[..., None] * hidden).sum(dim=1)
        picked = hidden[self.rows.to(hidden.device), self.columns.to(hidden.device)]  # [B, k, d]
        return picked[:, 0] if self.squeeze else picked


def select_rows(hidden: Tensor, pos: Tensor, at: At) -> Tensor:
    """Gather [B, k, d] (or [B, d]) from ``hidden`` [B, T, d] at read positions ``at`` given row positions ``pos``
    [B, T] (-1 = padding); detached. Capturing several layers of one call: resolve a ``ReadIndex`` once instead."""
    return ReadIndex.resolve(pos.to(hidden.device), at).gather(hidden)


def capture(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    layers: Sequence[int],
    at: str | int | Sequence | Tensor | At = "last",
    layers_path: str | None = None,
    stop_early: bool = True,
) -> dict[int, Tensor]:
    """Residual stream at ``layers`` and positions ``at``: ``{layer: [B, d]}`` (or ``[B, k, d]`` for k indices),
    keyed by the resolved layer index (``-1`` -> ``n_layers - 1``). Only this thread's forward pass is read: a
    forward of the same model in another thread meanwhile is left alone."""
    blocks = find_layers(model, layers_path)
    wanted = resolve_layers(layers, len(blocks))
    read_at = At.parse(at, input_ids.shape[0])
    tracker, mine = _own_thread_tracker()
    out: dict[int, Tensor] = {}

    reads: list[ReadIndex] = []  # resolved at the first captured layer, reused by the others

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            if not mine():
                return
            if not reads:
                reads.append(ReadIndex.resolve(tracker.positions, read_at))
            out[index] = reads[0].gather(hidden_of(output))
            if stop_early and index == wanted[-1]:
                raise _Stop

        return hook

    handles = tracker.attach(model, find_stack(model, layers_path))
    try:
        handles += [blocks[i].register_forward_hook(make_hook(i)) for i in wanted]
        with torch.no_grad(), contextlib.suppress(_Stop):
            model(**padded_inputs(input_ids, attention_mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: out[i] for i in wanted}


def _own_thread_tracker() -> tuple[PositionTracker, Callable[[], bool]]:
    """A position tracker that ignores forward calls from other threads, and the test it uses."""
    owner = threading.get_ident()

    def mine() -> bool:
        return threading.get_ident() == owner

    tracker = PositionTracker()
    tracker.active = mine
    return tracker, mine
