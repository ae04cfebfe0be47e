"""The hf backend's prefix-cached scoring session: ``SteeringModel.prefill(ids)`` -> ``session.score(...)``.

A session holds the KV cache of one shared token prefix (batch 1, e.g. a system prompt), computed once and reused by
every row it scores. ``score`` takes ``k`` rows that each start with that prefix and end in a suffix (an assistant
header plus a prefill, from ``begins[j]``), and a list of passes ``(m, interventions, layout)``: the user turns of
the ``k`` rows run once in one batch on top of the prefix (right-padded, so padding sits inside the cache, masked);
then per pass the cache is repeated ``m`` times per row and the suffixes (left-padded, so every row's answer position
is the last column) run under ``model.steer(interventions, layout)`` with rows = row x ``m``. Padding is masked and
``position_ids`` are each row's own, so every row computes what it would alone; the hooks read row positions from
the 2-D mask, so ``response`` touches exactly each row's real suffix. After each pass the cache is cropped back to
the user turns, after the call back to the prefix, so the session serves the next rows.

``prefill(None)`` is a session without a prefix: every pass runs the rows as whole prompts, left-padded (steering
that reaches into the prompt cannot reuse an unsteered cache).

All transformers cache surgery (``DynamicCache``, crop, repeat, select) lives here; the scorer in
``steering.compliance`` only plans rows and passes and reads the letter probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from steering.backends.base import pad_rows
from steering.backends.protocol import Pass


class PrefixSession:
    """A scoring session on an hf model over a cached prefix (``None``: no prefix, whole prompts)."""

    def __init__(self, model: Any, prefix: Sequence[int] | None):
        self.model = model  # the SteeringModel (or a subclass) that made the session
        self.shared = 0 if prefix is None else len(prefix)
        self.tokens_processed = 0  # tokens run through the model (cached prefix once, then every new token)
        self.cache = None
        if prefix is not None:
            from transformers import DynamicCache

            # Sliding-window layers of a config-built cache drop old tokens and then refuse to crop the suffix
            # back out; a cache of plain layers keeps every token (the attention mask applies the window).
            sliding = model.sliding_window() is not None
            self.cache = DynamicCache() if sliding else DynamicCache(config=model.model.config)
            ids = torch.tensor([list(prefix)], device=model.device)
            self.tokens_processed += self.shared
            self._forward(ids, torch.ones_like(ids), self.cache)

    def score(
        self,
        rows: Sequence[Sequence[int]],
        begins: Sequence[int],
        passes: Sequence[Pass],
        reduce: Callable[[Tensor], Tensor],
        readout: Mapping[int, Tensor | None] | None = None,
    ) -> list[tuple[Tensor, dict[int, Tensor]]]:
        """Per pass: ``reduce`` of the logits [k x m, vocab] at each row's last position (rows = row x cell, row
        major) and, with ``readout`` (``{layer: [K, d] | None}``, on the model's device), the readouts
        ``{layer: [k x m, K]}`` read in the same forward (``SteeringModel.readout``)."""
        rows, begins = [list(r) for r in rows], list(begins)
        if self.cache is None:
            return self._score_full(rows, passes, reduce, readout)
        return self._score_cached(rows, begins, passes, reduce, readout)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _reading(self, readout: Mapping[int, Tensor | None] | None):
        """The readout context of one pass (records nothing when no readout was asked for)."""
        return self.model.readout(readout) if readout else contextlib.nullcontext({})

    def _pad(self, parts: list[list[int]], side: str) -> tuple[Tensor, Tensor]:
        return pad_rows(parts, self.model.tokenizer.pad_token_id, side)

    @torch.no_grad()
    def _steered(self, m, ivs, layout, readout, ids, mask, cache, place) -> tuple[Tensor, dict[int, Tensor]]:
        """One pass: every row of ``ids`` / ``mask`` / ``place`` [k, ...] repeated ``m`` times (one copy per cell),
        run under ``ivs``; the last-column logits [k x m, vocab] and the readouts of that forward."""
        with self.model.steer(ivs, layout), self._reading(readout) as read:
            logits = self._forward(
                ids.repeat_interleave(m, dim=0),
                mask.repeat_interleave(m, dim=0),
                cache,
                None if place is None else place.repeat_interleave(m, dim=0),
            )
        return logits, dict(read)

    def _forward(self, ids: Tensor, mask: Tensor, cache=None, position_ids: Tensor | None = None) -> Tensor:
        """Logits [rows, vocab] at the last column of ``ids``; ``mask`` covers cached and new tokens."""
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        if self.model.keeps_logits():
            kwargs["logits_to_keep"] = 1  # only the answer position: saves the LM head on every other token
        out = self.model.model(
            input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None, **kwargs
        )
        return out.logits[:, -1]

    def _score_cached(self, rows, begins, passes, reduce, readout) -> list[tuple[Tensor, dict[int, Tensor]]]:
        """The ``k`` rows over the prefix in the cache (batch 1, ``shared`` tokens); see the module docstring."""
        cache, shared = self.cache, self.shared
        device, k = self.model.device, len(rows)
        users, user_mask = self._pad([row[shared:start] for row, start in zip(rows, begins)], "right")
        suffixes, suffix_mask = self._pad([row[start:] for row, start in zip(rows, begins)], "left")
        padded = not (bool(user_mask.all()) and bool(suffix_mask.all()))
        user_len, suffix_len = users.shape[1], suffixes.shape[1]
        head = torch.cat([torch.ones((k, shared), dtype=torch.long), user_mask], dim=1)
        full_mask = torch.cat([head, suffix_mask], dim=1)
        place = (full_mask.cumsum(-1) - 1).clamp(min=0)  # each row's own positions (pads: any value, masked)
        user_place = place[:, shared : shared + user_len].to(device) if padded else None
        suffix_place = place[:, -suffix_len:].to(device) if padded else None
        users, head, suffixes, full_mask = (t.to(device) for t in (users, head, suffixes, full_mask))
        self.tokens_processed += sum(start - shared for start in begins)
        if k > 1:
            cache.batch_repeat_interleave(k)
        out: list[tuple[Tensor, dict[int, Tensor]]] = []
        try:
            self._forward(users, head, cache, user_place)
            for m, ivs, layout in passes:
                self.tokens_processed += m * sum(len(row) - start for row, start in zip(rows, begins))
                if m > 1:
                    cache.batch_repeat_interleave(m)
                try:
                    logits, read = self._steered(m, ivs, layout, readout, suffixes, full_mask, cache, suffix_place)
                finally:
                    _crop(cache, shared + user_len)
                    if m > 1:
                        cache.batch_select_indices(torch.arange(0, k * m, m, device=device))
                out.append((reduce(logits), read))
        finally:
            _crop(cache, shared)
            if k > 1:
                cache.batch_select_indices(torch.zeros(1, dtype=torch.long, device=device))
        return out

    def _score_full(self, rows, passes, reduce, readout) -> list[tuple[Tensor, dict[int, Tensor]]]:
        """The ``k`` rows as whole prompts, left-padded, one row per row x cell."""
        device = self.model.device
        ids, mask = self._pad(rows, "left")
        place = (mask.cumsum(-1) - 1).clamp(min=0).to(device) if not bool(mask.all()) else None
        ids, mask = ids.to(device), mask.to(device)
        out: list[tuple[Tensor, dict[int, Tensor]]] = []
        for m, ivs, layout in passes:
            self.tokens_processed += m * sum(len(row) for row in rows)
            logits, read = self._steered(m, ivs, layout, readout, ids, mask, None, place)
            out.append((reduce(logits), read))
        return out


def _crop(cache, length: int) -> None:
    """Drop cached tokens beyond ``length`` (transformers >= 5.18 takes only a negative count)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
