"""The hooks engine: one steering context's interventions, grouped per layer and resolved once per forward call.

Every backend drives a ``Plan`` the same way:

1. before the decoder blocks run, hand it the row positions of the call's tokens: ``plan.tracker`` is a forward
   pre-hook for a transformers-style decoder stack (it reads the mask / position ids / KV cache), or call
   ``plan.begin(positions, layout, rows)`` directly (vLLM's flattened steps);
2. at each planned layer's output, ``hidden = plan.edit(layer, hidden)``.

Per call, each distinct (positions, coefficient) gets one scale tensor (``coefficient x mask``) shared by every layer
that uses it, and the edits are fused in-place updates (``addcmul_``) unless autograd needs the original tensor.

Registered on a torch module (``steer_module``), a plan is *scoped*: it edits only forward passes run by the thread
(more exactly, the ``contextvars`` context: a thread, or an asyncio task) that registered it, so a plain forward of
the same model in another thread meanwhile stays plain. Work that a forward hands to other threads (e.g.
``nn.DataParallel`` replicas) is therefore not steered: run such models from one thread per steering context.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .intervention import Intervention
from .layers import hidden_of, replace_hidden
from .positions import Positions, PositionTracker, RowLayout, check_layout, covered

_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("steering_plans", default=frozenset())
"""Ids of the plans whose module hooks act in the current context (see the module docstring)."""


class Plan:
    """Interventions grouped per layer (``groups``: layer index -> interventions, in the order given)."""

    def __init__(
        self,
        interventions: Intervention | Sequence[Intervention],
        n_layers: int,
        d_model: int | None,
        layout: RowLayout | None = None,
    ):
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise ValueError(f"expected Intervention objects, got {type(iv).__name__}")
        check_layout([iv.positions for iv in ivs], layout)
        self.groups: dict[int, list[Intervention]] = {}
        for iv in ivs:
            self.groups.setdefault(iv.check(n_layers, d_model), []).append(iv)
        self._live = [iv for iv in ivs if not iv.is_noop]  # coefficient-0 adds are skipped: bit-identical
        self.tracker = PositionTracker(layout, on_call=lambda tracker: self.begin(tracker.positions, tracker.layout))
        self._call: _Call | None = None
        self._on_device: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._scoped = False  # True once registered on a module: hooks then act only in the registering context
        self._calls = 0
        self._reached: dict[Positions, Tensor | bool] = {}  # explicit ranges: did they touch a token (per row)?
        self._longest: Tensor | None = None  # longest row seen (for the message when ranges touch nothing)

    @property
    def layers(self) -> list[int]:
        """Decoder-block indices this plan edits, ascending."""
        return sorted(self.groups)

    def begin(self, positions: Tensor, layout: RowLayout | None, rows: Tensor | None = None) -> None:
        """Resolve every intervention's mask for one forward call (errors surface here, before any layer runs).

        ``positions``: row positions of the call's tokens, [B, T] (batch rows x tokens; -1 = padding) or, with
        ``rows`` [N] (each token's row), flattened [N]. ``layout`` gives each row's ``prompt_len`` /
        ``response_start``.
        """
        n_rows = positions.shape[0] if rows is None else (int(rows.max()) + 1 if rows.numel() else 0)
        masks: dict[Positions, Tensor] = {}
        for iv in self._live:
            if iv.positions not in masks:
                lo, hi = iv.positions.bounds(layout, n_rows, positions.device)
                lo, hi = (lo[:, None, :], hi[:, None, :]) if rows is None else (lo[rows], hi[rows])
                masks[iv.positions] = covered(positions, lo, hi)
            coef = iv.coefficient
            if isinstance(coef, Tensor) and coef.shape[0] != n_rows:
                raise ValueError(
                    f"{coef.shape[0]} per-row coefficients but the batch has {n_rows} rows; pass one coefficient "
                    "per row (or a scalar)"
                )
        touched = {spec: bool(mask.any()) for spec, mask in masks.items()}
        if rows is None and any(spec.mode is None for spec in masks):
            self._note_reach(masks, touched, positions)
        live = {id(iv) for iv in self._live if touched[iv.positions]}
        ops = {layer: [iv for iv in group if id(iv) in live] for layer, group in self.groups.items()}
        self._call = _Call(masks, rows, ops)

    def _note_reach(self, masks: dict[Positions, Tensor], touched: dict[Positions, bool], positions: Tensor) -> None:
        """Remember whether each explicit-range spec touched a token (per row for per-row ranges)."""
        self._calls += 1
        longest = positions.max(dim=1).values + 1
        self._longest = longest if self._longest is None or self._longest.shape != longest.shape else (
            torch.maximum(self._longest, longest)
        )  # fmt: skip
        for spec, mask in masks.items():
            if spec.mode is not None:
                continue
            before = self._reached.get(spec, False)
            if spec.per_row:
                hit = mask.any(dim=-1)
                self._reached[spec] = hit if isinstance(before, bool) or before.shape != hit.shape else before | hit
            else:
                self._reached[spec] = bool(before) or touched[spec]

    def check_reached(self) -> None:
        """Raise if explicit ranges touched no token in every forward call since the plan was made (they lie
        beyond the rows: nothing was steered, silently). Steering contexts call it on a normal exit."""
        if not self._calls:
            return
        longest = None if self._longest is None else int(self._longest.max())
        for spec, hit in self._reached.items():
            if spec.per_row:
                missed = [b for b, row in enumerate(spec.ranges) if row and not bool(hit[b])]
                if missed:
                    b = missed[0]
                    raise ValueError(
                        f"positions {list(spec.ranges[b])} of row {b} lie beyond every token that row had (up to "
                        f"{int(self._longest[b])}): nothing was steered there; ranges count each row's tokens from 0"
                    )
            elif not hit:
                raise ValueError(
                    f"positions {list(spec.ranges)} lie beyond every token of the forward passes in this steering "
                    f"context (the longest row had {longest}): nothing was steered; ranges count each row's tokens "
                    "from 0"
                )

    def scope(self) -> _Scope:
        """Make this plan active only in the current context (thread / asyncio task) until the returned handle's
        ``remove()``: ``is_active()`` is then False elsewhere. Module hooks (``steer_module``, the TransformerLens
        hooks) and the position tracker (``scope_hooks``) check it on every call; nnsight checks it where a trace is
        dispatched (the trace may run elsewhere, remotely included)."""
        self._scoped = True
        _ACTIVE.set(_ACTIVE.get() | {id(self)})
        return _Scope(self)

    def scope_hooks(self) -> _Scope:
        """``scope()`` for a plan driven by module hooks in this process: its position tracker also ignores calls
        from other contexts."""
        handle = self.scope()
        self.tracker.active = self.is_active
        return handle

    def is_active(self) -> bool:
        """Whether this plan's module hooks act in the current context (always, for an unscoped plan)."""
        return not self._scoped or id(self) in _ACTIVE.get()

    def edit(self, layer: int, hidden: Tensor) -> Tensor:
        """The residual stream after this plan's interventions at ``layer``; ``hidden`` [B, T, d] (or [N, d] for a
        flattened call). Edited in place where autograd allows; the returned tensor is the one to use.

        Interventions apply in the order given. Consecutive adds commute, so a run of several is one matmul
        (``scales [..., k] @ vectors [k, d]``): many cells in one batch cost about as much as one."""
        call = self._call
        if call is None:
            if layer not in self.groups:
                return hidden
            raise RuntimeError("no forward call seen yet: feed the plan the call's positions first (plan.begin)")
        live = call.ops.get(layer)  # this call's interventions at the layer that touch some token
        if not live:
            return hidden
        in_place = not (torch.is_grad_enabled() and hidden.requires_grad)
        start = 0
        while start < len(live):
            iv = live[start]
            if iv.operation == "add":
                end = start
                while end < len(live) and live[end].operation == "add":
                    end += 1
                hidden = self._add(live[start:end], hidden, call, in_place)
                start = end
                continue
            vector, unit = self._tensors(iv, hidden)
            weight = call.weight(iv.positions, 1.0, hidden)
            removed = (hidden @ unit).unsqueeze(-1) * weight  # [..., 1]
            hidden = hidden.addcmul_(removed, unit, value=-1) if in_place else hidden - removed * unit
            if iv.operation == "ablate_then_add":
                scale = call.weight(iv.positions, iv.coefficient, hidden)
                hidden = hidden.addcmul_(scale, vector) if in_place else hidden + scale * vector
            start += 1
        return hidden

    def _add(self, ivs: list[Intervention], hidden: Tensor, call: _Call, in_place: bool) -> Tensor:
        """``hidden + sum_i scale_i * vector_i`` for a run of add-interventions (one fused op per run)."""
        if len(ivs) == 1:
            iv = ivs[0]
            vector, _ = self._tensors(iv, hidden)
            scale = call.weight(iv.positions, iv.coefficient, hidden)
            return hidden.addcmul_(scale, vector) if in_place else hidden + scale * vector
        vectors = self._stacked(ivs, hidden)  # [k, d]
        scales = call.weights([(iv.positions, iv.coefficient) for iv in ivs], hidden)  # [..., k]
        if in_place and hidden.is_contiguous():
            hidden.view(-1, hidden.shape[-1]).addmm_(scales.view(-1, len(ivs)), vectors)
            return hidden
        return hidden + scales @ vectors

    def _stacked(self, ivs: list[Intervention], like: Tensor) -> Tensor:
        """The vectors of ``ivs`` as one [k, d] matrix on ``like``'s device and dtype (built once)."""
        key = (tuple(id(iv) for iv in ivs), like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = (torch.stack([self._tensors(iv, like)[0] for iv in ivs]), None)
        return self._on_device[key][0]

    def hook(self, layer: int):
        """A forward hook for decoder block ``layer`` (its output is a tensor or a tuple led by the tensor)."""

        def edit_output(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
            if not self.is_active():
                return output
            hidden = hidden_of(output)
            edited = self.edit(layer, hidden)
            return output if edited is hidden else replace_hidden(output, edited)

        return edit_output

    def _tensors(self, iv: Intervention, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The vector (and its unit direction, for ablation) on ``like``'s device and dtype, converted once."""
        key = (id(iv), like.device, like.dtype)
        if key not in self._on_device:
            vector = iv.vector.to(device=like.device, dtype=like.dtype)
            unit = None
            if iv.operation != "add":
                unit = (iv.vector.double() / iv.vector.double().norm()).to(device=like.device, dtype=like.dtype)
            self._on_device[key] = (vector, unit)
        return self._on_device[key]


class _Scope:
    """Handle of ``Plan.scope``: ``remove()`` ends the plan's activity in the context that calls it."""

    def __init__(self, plan: Plan):
        self.plan_id = id(plan)

    def remove(self) -> None:
        _ACTIVE.set(_ACTIVE.get() - {self.plan_id})


class _Call:
    """One forward call's masks, and the scales derived from them (shared across layers)."""

    def __init__(self, masks: dict[Positions, Tensor], rows: Tensor | None, ops: dict[int, list[Intervention]]):
        self.masks = masks
        self.rows = rows
        self.ops = ops
        self._scales: dict[tuple, Tensor] = {}

    def weight(self, spec: Positions, coefficient: float | Tensor, like: Tensor) -> Tensor:
        """``coefficient x mask`` as [..., 1] on ``like``'s device and dtype (a scalar or one value per row)."""
        key = (spec, _coef_key(coefficient), like.device, like.dtype)
        scale = self._scales.get(key)
        if scale is None:
            mask = self.masks[spec].to(device=like.device, dtype=like.dtype)
            if isinstance(coefficient, Tensor):
                coef = coefficient.to(device=like.device, dtype=like.dtype)
                coef = coef[:, None] if self.rows is None else coef[self.rows.to(like.device)]
                mask = mask * coef
            elif coefficient != 1.0:
                mask = mask * coefficient
            scale = self._scales[key] = mask.unsqueeze(-1)
        return scale

    def weights(self, terms: list[tuple[Positions, float | Tensor]], like: Tensor) -> Tensor:
        """Several ``weight``s side by side: [..., k] (shared by every layer with the same terms)."""
        key = (tuple((spec, _coef_key(coef)) for spec, coef in terms), like.device, like.dtype)
        scales = self._scales.get(key)
        if scales is None:
            scales = self._scales[key] = torch.cat([self.weight(spec, coef, like) for spec, coef in terms], dim=-1)
        return scales


def _coef_key(coefficient: float | Tensor) -> float | int:
    return coefficient if isinstance(coefficient, float) else id(coefficient)


def steer_module(model: nn.Module, plan: Plan, layers: nn.ModuleList, stack: nn.Module) -> list:
    """Register ``plan`` on a transformers-style model: the position tracker on the decoder stack and one forward
    hook per planned layer, acting only in the calling thread / context (``Plan.scope``). Returns the handles; remove
    them to unsteer."""
    handles = [plan.scope_hooks(), *plan.tracker.attach(model, stack)]
    try:
        for index in plan.layers:
            handles.append(layers[index].register_forward_hook(plan.hook(index)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles
