"""Steer positions: which tokens of each forward call an intervention touches, in absolute row positions.

A *row position* is a token's index in its own row's unpadded sequence (0 = the row's first real token). It is
computed from the attention mask (or ``position_ids`` / the KV-cache length) of every forward call, so it stays
right under left padding, rows of different lengths and KV-cache generation, where each call sees only new tokens.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("all", "prompt", "response", "generated")


@dataclass(frozen=True)
class RowLayout:
    """Per-row facts that position modes need, in row positions.

    ``prompt_len`` [B]: real tokens in each row's prompt (``generated`` starts there).
    ``response_start`` [B]: where the assistant turn starts, its header tokens included (``response`` starts there).
    """

    prompt_len: Tensor
    response_start: Tensor | None = None

    def check_batch(self, batch: int) -> None:
        for name in ("prompt_len", "response_start"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(
                    f"RowLayout.{name} has {value.shape[0]} rows but the batch has {batch}; encode the same "
                    "prompts you run (model.encode(...)) and pass its layout"
                )


@dataclass(frozen=True)
class Positions:
    """Which positions to touch: a mode from ``MODES`` or explicit half-open ranges of row positions.

    ``ranges`` is either shared by all rows (``[(start, end), ...]``) or one list per row; ``end=None`` is open.
    """

    mode: str | None = None
    ranges: tuple | None = None
    per_row: bool = False

    @classmethod
    def parse(cls, value: str | Positions | Sequence) -> Positions:
        if isinstance(value, Positions):
            return value
        if isinstance(value, str):
            if value not in MODES:
                raise ValueError(
                    f"unknown position mode {value!r}; use one of {', '.join(MODES)} or a list of (start, end) ranges"
                )
            return cls(mode=value)
        items = list(value)
        if not items:
            raise ValueError("positions is an empty list; pass a mode such as 'all' or at least one (start, end) range")
        if all(_is_range(r) for r in items):
            return cls(ranges=tuple(_range(r) for r in items))
        if all(isinstance(row, Sequence) and all(_is_range(r) for r in row) for row in items):
            return cls(ranges=tuple(tuple(_range(r) for r in row) for row in items), per_row=True)
        raise ValueError(
            f"positions={value!r} is not understood; pass a mode ({', '.join(MODES)}), a list of (start, end) ranges, "
            "or one such list per batch row"
        )

    def needs(self) -> str | None:
        """The ``RowLayout`` field this spec reads, if any."""
        return {"response": "response_start", "prompt": "prompt_len", "generated": "prompt_len"}.get(self.mode)

    def bounds(self, layout: RowLayout | None, rows: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Half-open row-position intervals per row: ``(lo [rows, K], hi [rows, K])``; a token at row position ``p``
        of row ``b`` is touched when ``lo[b, k] <= p < hi[b, k]`` for some ``k``. Every mode is one interval."""
        if self.mode is not None:
            lo = torch.zeros(rows, dtype=torch.long, device=device)
            hi = torch.full((rows,), OPEN, dtype=torch.long, device=device)
            if self.mode != "all":
                field = self.needs()
                value = None if layout is None else getattr(layout, field)
                if value is None:
                    raise ValueError(missing_layout_message(self.mode))
                value = value.to(device=device, dtype=torch.long)
                if self.mode == "prompt":
                    hi = value
                else:
                    lo = value
            return lo[:, None], hi[:, None]
        lo, hi = _range_bounds(self.ranges, self.per_row, rows)
        return lo.to(device), hi.to(device)

    def mask(self, pos: Tensor, layout: RowLayout | None) -> Tensor:
        """Boolean mask [B, T] of the positions to touch, given row positions ``pos`` [B, T] (-1 for padding)."""
        lo, hi = self.bounds(layout, pos.shape[0], pos.device)
        return covered(pos, lo[:, None, :], hi[:, None, :])


OPEN = 2**62  # the end of an open interval


@functools.lru_cache(maxsize=256)
def _range_bounds(ranges: tuple, per_row: bool, rows: int) -> tuple[Tensor, Tensor]:
    """``Positions.bounds`` of explicit ranges, built once per (ranges, rows): [rows, K] each, on the CPU."""
    per_row_ranges = ranges if per_row else [ranges] * rows
    if len(per_row_ranges) != rows:
        raise ValueError(f"positions has ranges for {len(per_row_ranges)} rows but the batch has {rows}")
    width = max(1, max(len(r) for r in per_row_ranges))
    lo = torch.zeros(rows, width, dtype=torch.long)
    hi = torch.zeros(rows, width, dtype=torch.long)  # [0, 0) is empty: pads rows with fewer ranges
    for b, row in enumerate(per_row_ranges):
        for k, (start, end) in enumerate(row):
            lo[b, k], hi[b, k] = start, OPEN if end is None else end
    return lo, hi


def covered(pos: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """True where row position ``pos`` (any shape ``S``, -1 = padding) lies in one of the intervals ``lo`` /
    ``hi`` (shape ``S + [K]``, broadcastable)."""
    inside = (pos[..., None] >= lo) & (pos[..., None] < hi)
    return inside.any(-1) & (pos >= 0)


def missing_layout_message(mode: str) -> str:
    """The one message for a position mode whose row facts are unknown."""
    if mode == "response":
        return (
            "positions='response' needs where the assistant turn starts: encode chat prompts with "
            "model.encode(messages) and pass its layout, or pass RowLayout(response_start=...)"
        )
    return (
        f"positions={mode!r} needs to know where each prompt ends, and this call continues a KV cache filled "
        "outside the steering context; pass steer(..., layout=model.encode(prompts).layout) or "
        "RowLayout(prompt_len=...)"
    )


def check_layout(specs: Sequence[Positions], layout: RowLayout | None) -> None:
    """Raise before any compute when a spec needs ``response_start`` and ``layout`` lacks it (``prompt_len`` can
    still be inferred from the first call)."""
    for spec in specs:
        if spec.needs() == "response_start" and (layout is None or layout.response_start is None):
            raise ValueError(missing_layout_message("response"))


def _index(x: object) -> int | None:
    """``x`` as an int when it is one: Python ints, numpy integers, integer 0-d tensors (not bools or floats)."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _is_range(r: object) -> bool:
    return isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2 and _index(r[0]) is not None


def _range(r: Sequence) -> tuple[int, int | None]:
    start, end = _index(r[0]), (None if r[1] is None else _index(r[1]))
    if start is None or (r[1] is not None and end is None):
        raise ValueError(f"range {tuple(r)} is invalid; its bounds must be integers (end may be None)")
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"range {tuple(r)} is invalid; ranges are (start, end) with 0 <= start < end (or end=None)")
    return start, end


def row_positions(
    length: int,
    batch: int,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    past_len: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """Row positions [B, T] of the ``length`` new tokens of one forward call; -1 marks padding."""
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and attention_mask.shape[-1] >= length:
        mask = attention_mask.to(torch.long)
        pos = (mask.cumsum(-1) - 1)[:, -length:]
        return torch.where(mask[:, -length:].bool(), pos, torch.full_like(pos, -1))
    if position_ids is not None:
        ids = position_ids[-1] if position_ids.dim() == 3 else position_ids  # multimodal rope: [3, B, T]
        return ids.to(torch.long).expand(batch, length)
    return (torch.arange(length, device=device) + past_len).expand(batch, length)


# Names under which transformers 4.x / 5.x hand the decoder stack its KV cache (5.24 renamed it to ``cache``).
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def past_length(kwargs: dict) -> int | None:
    """Tokens already in the KV cache of a forward call, read under every name transformers uses; ``None`` when a
    cache is there but its length cannot be read (an unknown cache type)."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)):  # legacy format: one (key [B, H, T, d], value) pair per layer
            if not cache:
                return 0
            first = cache[0][0] if isinstance(cache[0], (tuple, list)) else cache[0]
            return int(first.shape[-2]) if isinstance(first, Tensor) else None
        return None
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position.flatten()[0])
    return 0


class PositionTracker:
    """Forward pre-hook for the decoder stack: records the row positions of every call.

    Positions come from the 2-D attention mask, else ``position_ids``, else the KV-cache length (under any of the
    names in ``CACHE_KWARGS``, or ``cache_position``). A call whose positions cannot be established raises.

    Without an explicit layout, the first call with an empty KV cache defines the prompt (``prompt_len`` = its real
    tokens per row), so ``with steer(...): model.generate(...)`` needs no extra arguments for ``prompt`` /
    ``generated``. A later call with an empty cache that repeats those prompt tokens (``use_cache=False``
    generation recomputes the whole sequence each step) keeps that prompt; any other one starts a new prompt.
    """

    def __init__(self, layout: RowLayout | None = None, on_call: Callable[[PositionTracker], None] | None = None):
        self.layout = layout
        self.on_call = on_call  # e.g. a Plan resolving its masks once per call, before any layer runs
        self.active: Callable[[], bool] | None = None  # if set, calls for which it is False are ignored (threads)
        self._given = layout is not None
        self.positions: Tensor | None = None
        self._outer_mask: Tensor | None = None
        self._prompt: list[Tensor] | None = None  # inferred prompt: each row's real token ids (or embeddings)

    def attach(self, model: torch.nn.Module, stack: torch.nn.Module) -> list:
        """Register on the decoder stack, and on the outer model when they differ: multimodal wrappers hand the
        stack 4-D / per-layer-type masks, so the 2-D padding mask is read where the user passed it."""
        handles = [stack.register_forward_pre_hook(self, with_kwargs=True)]
        if model is not stack:
            handles.append(model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
            handles.append(model.register_forward_hook(self._forget_mask))
        return handles

    def _remember_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active is not None and not self.active():
            return
        mask = kwargs.get("attention_mask")
        self._outer_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _forget_mask(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if self.active is not None and not self.active():
            return
        self._outer_mask = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active is not None and not self.active():
            return
        hidden = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = hidden if hidden is not None else ids
        if ref is None:
            raise ValueError("steering hooks could not find input_ids or inputs_embeds in the forward call")
        batch, length = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, Tensor) and mask.dim() == 2):
            mask = self._outer_mask
        has_mask = isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[-1] >= length
        past = past_length(kwargs)
        if past is None:
            if not (has_mask or kwargs.get("position_ids") is not None):
                cache = next(type(kwargs[n]).__name__ for n in CACHE_KWARGS if kwargs.get(n) is not None)
                raise ValueError(
                    f"cannot tell the positions of this forward call: its KV cache ({cache}) has no readable length "
                    "and the call has no attention_mask or position_ids; pass attention_mask (covering cached and "
                    "new tokens) or position_ids, and a layout (steer(..., layout=model.encode(...).layout))"
                )
            past = mask.shape[-1] - length if has_mask else -1  # -1: unknown but non-empty
        elif has_mask and past == 0:
            past = mask.shape[-1] - length  # a cache we could not see: the mask still covers it
        self.positions = row_positions(length, batch, mask, kwargs.get("position_ids"), max(past, 0), ref.device)
        if self._given:
            self.layout.check_batch(batch)
        elif past == 0 and not self._continues_prompt(ref):
            self.layout = RowLayout(prompt_len=self.positions.max(dim=1).values + 1)
            self._prompt = [row[self.positions[b] >= 0] for b, row in enumerate(ref)]
        if self.on_call is not None:
            self.on_call(self)

    def _continues_prompt(self, ref: Tensor) -> bool:
        """True when this fresh call repeats the inferred prompt (``use_cache=False`` generation): same rows, and
        each row starts with that prompt's tokens."""
        if self._prompt is None or len(self._prompt) != ref.shape[0]:
            return False
        for b, prompt in enumerate(self._prompt):
            row = ref[b][self.positions[b] >= 0]
            if row.shape[0] <= prompt.shape[0] or not torch.equal(row[: prompt.shape[0]], prompt):
                return False
        return True
