"""Steering and capture through other backends: TransformerLens hook points and nnsight traces.

Every backend reuses the plain-transformers semantics: a ``PositionTracker`` fed with the decoder stack's forward
inputs gives each token's row position, ``Intervention.apply`` edits the residual stream, ``At`` picks capture
positions. The backend modules import their library only when called, so importing this package is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..capture import At, _select
from ..intervene import Intervention, check_interventions
from ..positions import PositionTracker, RowLayout

NAMES = ("hf", "transformer_lens", "nnsight")


class Plan:
    """The interventions of one steering context, grouped by layer, with the tracker that gives their positions."""

    def __init__(
        self,
        interventions: Intervention | Sequence[Intervention],
        n_layers: int,
        d_model: int | None,
        layout: RowLayout | None = None,
    ):
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        check_interventions(ivs, n_layers, d_model)
        for iv in ivs:
            if iv.positions.needs() == "response_start" and (layout is None or layout.response_start is None):
                raise ValueError(
                    "positions='response' needs where the assistant turn starts: encode chat prompts with "
                    "model.encode(messages) and pass its layout, or pass RowLayout(response_start=...)"
                )
        self.tracker = PositionTracker(layout, [iv.positions for iv in ivs])
        self.groups: dict[int, list[Intervention]] = {}
        for iv in ivs:
            self.groups.setdefault(iv.layer % n_layers, []).append(iv)

    @property
    def layers(self) -> list[int]:
        """Decoder-block indices this plan edits, ascending."""
        return sorted(self.groups)

    def apply(self, layer: int, hidden: Tensor) -> Tensor:
        """The residual stream [B, T, d] after this plan's interventions at ``layer``.

        Masks are moved to ``hidden``'s device, so a model split over devices (``device_map="auto"``) works.
        """
        for iv in self.groups.get(layer, ()):
            hidden = iv.apply(hidden, self.tracker.mask(iv.positions).to(hidden.device))
        return hidden


def capture_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Requested capture layers normalised to ``0..n_layers-1``, sorted, unique (ValueError if out of range)."""
    for i in layers:
        if not -n_layers <= int(i) < n_layers:
            raise ValueError(f"layer {i} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted({int(i) % n_layers for i in layers})


def select(hidden: Tensor, tracker: PositionTracker, at: At) -> Tensor:
    """Rows of ``hidden`` [B, T, d] at capture positions ``at``: [B, d] or [B, k, d] (detached)."""
    if tracker.positions is None:
        raise RuntimeError("no forward call seen yet: the decoder stack's inputs were not read")
    return _select(hidden.detach(), tracker.positions.to(hidden.device), at)


def attach_tracker(tracker: PositionTracker, model: nn.Module, stack: nn.Module) -> list:
    """Register ``tracker`` as a forward pre-hook on the decoder stack (and the outer model where supported)."""
    attach = getattr(tracker, "attach", None)
    if attach is not None:
        return attach(model, stack)
    return [stack.register_forward_pre_hook(tracker, with_kwargs=True)]


__all__ = ["NAMES", "Plan", "attach_tracker", "capture_layers", "select"]
