"""vLLM backend, the wire format: what travels between the driver (``model.py``) and vLLM's processes.

Each request carries its steering in ``SamplingParams.extra_args[EXTRA_KEY]``: a ``RequestSpec`` (its prompt facts
``prompt_len`` / ``response_start``, its ``SteerItem`` list, what to capture or record) in its msgpack-safe form
(``RequestSpec.wire()``; ``RequestSpec.from_wire`` reads it back). A ``SteerItem`` is one intervention of one
request: layer, vector id, coefficient, operation and positions (a mode, ``all`` / ``prompt`` / ``response`` /
``generated``, or that row's explicit ``[(start, end | None), ...]``). Vectors travel once per engine by content
id (``vector_id``), as ``pack``-ed bytes: vLLM's msgpack RPC does not carry tensors.

The steering digest of a prefix-cache block (``steering_block_key``) and the cache salt of engines without the
scheduler patch (``cache_salt``) are functions of the wire form, computed where the request is (the scheduler's
process, the driver). Of ours, this module imports only ``steering.hooks``; it never imports vLLM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from steering.hooks.positions import MODES

EXTRA_KEY = "steering"  # the key of a request's steering in SamplingParams.extra_args
Range = tuple[int, int | None]  # half-open [start, end); end None = open
PositionSpec = str | tuple[Range, ...]  # a position mode, or one row's explicit ranges


def pack(t: Tensor) -> list:
    """Tensor -> ``[dtype name, shape, raw bytes]``: survives vLLM's msgpack RPC (multiprocess engine, TP workers),
    which does not carry ``torch.Tensor`` without ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. bf16 included."""
    t = t.detach().contiguous().cpu()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()]


def unpack(packed: list | Tensor) -> Tensor:
    """Inverse of ``pack`` (a Tensor passes through: the in-process engine does not serialize)."""
    if isinstance(packed, Tensor):
        return packed
    dtype, shape, raw = packed
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def vector_id(vector: Tensor) -> str:
    """Content id of a vector [d] (its float32 bytes): identical vectors share one slot on the workers."""
    data = vector.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:24]


def resolve_positions(positions: str | Sequence, prompt_len: int, response_start: int | None) -> list[Range]:
    """Absolute half-open ranges of one request for a mode or explicit ranges, as ``Positions.bounds`` defines
    them: ``all`` [0, inf), ``prompt`` [0, prompt_len), ``response`` [response_start, inf), ``generated``
    [prompt_len, inf) (the first sampled token is fed at position ``prompt_len``)."""
    if isinstance(positions, str):
        if positions == "all":
            return [(0, None)]
        if positions == "prompt":
            return [(0, int(prompt_len))]
        if positions == "generated":
            return [(int(prompt_len), None)]
        if positions == "response":
            if response_start is None:
                raise ValueError("positions='response' needs the request's response_start (a chat prompt)")
            return [(int(response_start), None)]
        raise ValueError(f"unknown position mode {positions!r}; use one of {', '.join(MODES)}")
    return [(int(s), None if e is None else int(e)) for s, e in positions]


@dataclass(frozen=True)
class SteerItem:
    """One intervention of one request: ``coefficient`` x the vector ``vector`` (its id) at ``layer``, applied by
    ``operation`` at ``positions`` (a mode, or this row's explicit ranges). A request's items are ordered: within a
    layer, order matters (ablate and add do not commute)."""

    layer: int
    vector: str
    coefficient: float
    operation: str
    positions: PositionSpec

    @classmethod
    def coerce(cls, item: SteerItem | Sequence) -> SteerItem:
        """``item`` as a ``SteerItem``: as given, or from its wire list ``[layer, vector id, coefficient, operation,
        positions]``."""
        if isinstance(item, SteerItem):
            return item
        layer, vid, coef, op, pos = item
        pos = pos if isinstance(pos, str) else tuple((int(s), None if e is None else int(e)) for s, e in pos)
        return cls(int(layer), str(vid), float(coef), str(op), pos)

    def wire(self) -> list:
        pos = self.positions
        return [self.layer, self.vector, self.coefficient, self.operation, pos if isinstance(pos, str) else
                [[s, e] for s, e in pos]]  # fmt: skip

    def ranges(self, prompt_len: int, response_start: int | None) -> list[Range]:
        """This item's absolute ranges in a request with ``prompt_len`` / ``response_start``."""
        return resolve_positions(self.positions, prompt_len, response_start)


@dataclass(frozen=True)
class RequestSpec:
    """Everything one request tells the engine about its steering.

    ``steer``: ordered ``SteerItem``s. ``capture_layers`` / ``capture_positions``: read the residual stream (after
    that layer's steering) at these absolute positions; ``capture_norms`` keeps only each row's L2 norm.
    ``record``: log computed and steered positions and check them against the model's own positions tensor (a test
    oracle; costs device syncs). ``key`` names the request's captures and records.
    """

    key: str
    prompt_len: int
    response_start: int | None
    steer: tuple[SteerItem, ...] = ()
    capture_layers: tuple[int, ...] = ()
    capture_positions: tuple[int, ...] = ()
    capture_norms: bool = False
    record: bool = False

    def wire(self) -> dict:
        """The msgpack-safe form carried in ``SamplingParams.extra_args[EXTRA_KEY]``."""
        return {
            "key": self.key,
            "pl": int(self.prompt_len),
            "rs": None if self.response_start is None else int(self.response_start),
            "steer": [item.wire() for item in self.steer],
            "cap_layers": [int(layer) for layer in self.capture_layers],
            "cap_pos": [int(p) for p in self.capture_positions],
            "cap_norm": bool(self.capture_norms),
            "record": bool(self.record),
        }

    @classmethod
    def from_wire(cls, extra: dict) -> RequestSpec:
        rs = extra.get("rs")
        return cls(
            key=str(extra["key"]),
            prompt_len=int(extra["pl"]),
            response_start=None if rs is None else int(rs),
            steer=tuple(SteerItem.coerce(item) for item in extra.get("steer", [])),
            capture_layers=tuple(int(x) for x in extra.get("cap_layers", [])),
            capture_positions=tuple(int(x) for x in extra.get("cap_pos", [])),
            capture_norms=bool(extra.get("cap_norm", False)),
            record=bool(extra.get("record", False)),
        )


def request_extra(
    key: str,
    prompt_len: int,
    response_start: int | None,
    steer: Sequence[SteerItem | Sequence] = (),
    capture_layers: Sequence[int] = (),
    capture_positions: Sequence[int] = (),
    capture_norms: bool = False,
    record: bool = False,
) -> dict:
    """The wire form of a ``RequestSpec`` built from these fields (``steer`` items as ``SteerItem``s or their
    ``(layer, vector id, coefficient, operation, positions)`` form)."""
    items = tuple(SteerItem.coerce(item) for item in steer)
    return RequestSpec(
        key, prompt_len, response_start, items, tuple(capture_layers), tuple(capture_positions), capture_norms, record
    ).wire()


def _clipped(extra: dict, end: int | None) -> list:
    """The request's steering as absolute ranges clipped to ``[0, end)`` (all of it for ``end=None``)."""
    items = []
    for item in map(SteerItem.coerce, extra.get("steer", [])):
        ranges = item.ranges(extra["pl"], extra.get("rs"))
        if end is not None:
            ranges = [(s, end if e is None else min(e, end)) for s, e in ranges if s < end]
        if ranges:
            ranges = sorted([s, -1 if e is None else e] for s, e in ranges)
            items.append([item.layer, item.vector, repr(float(item.coefficient)), item.operation, ranges])
    return items


def steering_block_key(extra: dict | None, end: int) -> str | None:
    """Digest of a request's steering (its wire form) restricted to positions ``[0, end)`` (``None``: nothing
    steered there).

    The KV of a block covering ``[start, end)`` depends on the tokens ``[0, end)`` (vLLM's hash chain covers them)
    and on the steering at positions ``[0, end)``, nothing later, so adding this digest to the block's hash makes
    sharing exact and maximal. Intervention order is kept (ablate and add do not commute).
    """
    items = _clipped(extra or {}, end)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32] if items else None


def cache_salt(extra: dict) -> str | None:
    """A prefix-cache salt for engines without the block-key patch: the digest of the request's whole steering
    (exact always; a steered request then shares no block, not even an unsteered prompt, with other cells)."""
    items = _clipped(extra, None)
    return "steer:" + hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32] if items else None
