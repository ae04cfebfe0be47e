"""What every backend's model shares: ``TextModel``, the half that needs no forward pass (tokenizer, chat
formatting, encoding, layer and context checks, interventions), and ``Encoded``, a tokenized batch with its row
layout. The backends (``steering.backends.hf`` and the others) subclass ``TextModel``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from steering.backends.errors import Unsupported
from steering.coefficients import relative_scale
from steering.hooks import Intervention, RowLayout, resolve_layer, resolve_layers

log = logging.getLogger("steering")

Prompt = str | Sequence[dict]

# Neutral text for the mean residual norm per layer (norm-relative coefficients); fixed so norms are reproducible.
NORM_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "She packed a sandwich, an apple and a bottle of water before leaving for the long hike.",
    "The committee will review the proposal next week and publish its decision in the spring.",
)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int | None, side: str = "left") -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [B, width] of ``rows`` padded on ``side`` (host tensors)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


@dataclass
class Encoded:
    """A tokenized batch: ``input_ids`` / ``attention_mask`` [B, T] plus the row layout for position modes."""

    input_ids: Tensor
    attention_mask: Tensor
    layout: RowLayout

    def to(self, device: torch.device | str) -> Encoded:
        layout = RowLayout(
            self.layout.prompt_len.to(device),
            None if self.layout.response_start is None else self.layout.response_start.to(device),
        )
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), layout)

    @property
    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


class TextModel:
    """The half of a steering model that needs no forward pass: tokenizer, chat formatting, encoding, layer and
    context checks, and interventions (norm-relative coefficients via ``residual_norms``, which subclasses give).

    ``SteeringModel`` (a torch module in this process) and engine-backed models such as ``VLLMModel`` share it.
    Subclasses set ``name``, ``tokenizer``, ``n_layers`` and ``d_model`` (``_init_text``) and implement
    ``residual_norms``, ``capture``, ``steer`` and ``generate``, and the capabilities they have (``prefill``,
    ``can_prefill``, ``batches_continuously``, ``reads_while_generating``): together, ``protocol.Backend``.
    """

    backend = "hf"
    source = None  # what ``load_model`` loaded the model from (a folder, .gguf file or hub id); None: built in memory

    def _init_text(self, tokenizer, name: str, n_layers: int, d_model: int) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._norms: Tensor | None = None

    @property
    def device(self) -> torch.device:
        """Where encoded batches go."""
        return torch.device("cpu")

    @property
    def context_limit(self) -> int | None:
        """Longest sequence the model takes (tokens), if known."""
        return None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def residual_norms(self) -> Tensor:
        """Mean L2 norm of the residual stream per layer [n_layers] on fixed neutral text (``NORM_TEXTS``)."""
        raise NotImplementedError

    # ---- capabilities (``steering.backends.protocol``): none by default; each backend says what it has ---------
    def prefill(self, ids: Sequence[int] | None):
        """A prefix-cached scoring session (``protocol.ScoringSession``); this backend has no forward pass."""
        raise Unsupported(
            f"{self.name} runs on the {self.backend} backend, which has no forward pass to score with; use "
            "generate() and capture(), scorer='judge' in sweeps, or load it with backend='hf'"
        )

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes (sizes scoring batches); needs ``prefill``."""
        raise Unsupported(f"the {self.backend} backend has no scoring session, so no KV cache to size")

    def sliding_window(self) -> int | None:
        """The model's sliding attention window, if any."""
        return None

    @classmethod
    def can_prefill(cls) -> bool:
        """Whether ``prefill`` works (the forced-choice scorer needs it)."""
        return False

    @classmethod
    def batches_continuously(cls) -> bool:
        """Whether one call with many rows is cheaper than several small calls (continuous batching)."""
        return False

    @classmethod
    def reads_while_generating(cls) -> bool:
        """Whether ``generate_with_readouts`` is verified on this backend."""
        return False

    # ---- text ----------------------------------------------------------------------------------------------
    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (a list of ``{"role", "content"}``), as text."""
        if not self.has_chat_template:
            raise ValueError(
                f"the tokenizer of {self.name} has no chat template; pass plain strings, or set "
                "tokenizer.chat_template to a Jinja template"
            )
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"]

    def chat_ids(self, messages: Sequence[dict], suffix: str = "") -> tuple[list[int], int]:
        """Token ids of ``messages`` with the generation prompt (assistant header) and ``suffix`` (e.g. a prefill),
        and ``response_start``: where the assistant header begins. The one place that computes it."""
        return self.chat_ids_many([messages], suffix)[0]

    def chat_ids_many(self, chats: Sequence[Sequence[dict]], suffix: str = "") -> list[tuple[list[int], int]]:
        """``chat_ids`` of several conversations in one batched tokenizer call."""
        if not chats:
            return []
        heads = [self.format_chat(messages, add_generation_prompt=False) for messages in chats]
        fulls = [self.format_chat(messages, add_generation_prompt=True) + suffix for messages in chats]
        encoded = self.tokenizer(fulls + heads, add_special_tokens=not self.has_chat_template)["input_ids"]
        out = []
        for ids, head in zip(encoded[: len(chats)], encoded[len(chats) :]):
            if ids[: len(head)] != head:
                raise ValueError(
                    "the chat template tokenizes the conversation differently once the assistant header is added, "
                    "so where the response starts is ambiguous; use a template whose header only appends tokens"
                )
            out.append((ids, len(head)))
        return out

    def encode(self, prompts: Sequence[Prompt] | Prompt, padding_side: str = "left") -> Encoded:
        """Tokenize strings or chat conversations into a padded batch with its ``RowLayout``.

        A conversation gets the generation prompt (assistant header); its ``response_start`` is where that
        header begins, so ``positions="response"`` covers the header and everything the model writes after it.
        """
        rows, starts = self._tokenize(prompts)
        return self._pad(rows, starts, padding_side)

    def _tokenize(self, prompts: Sequence[Prompt] | Prompt) -> tuple[list[list[int]], list[int | None]]:
        """Unpadded token ids of each prompt and its ``response_start`` (None for a plain string)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts to encode; pass at least one string or conversation")
        rows, starts = [], []
        for prompt in prompts:
            if isinstance(prompt, str):
                rows.append(self._ids(prompt))
                starts.append(None)
            else:
                ids, start = self.chat_ids(prompt)
                rows.append(ids)
                starts.append(start)
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(
                f"prompt {empty[0]} is empty (it encodes to no tokens), so there is nothing to run; pass non-empty "
                "text or a conversation"
            )
        return rows, starts

    def _pad(self, rows: list[list[int]], starts: list[int | None], padding_side: str) -> Encoded:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        ids, mask = pad_rows(rows, self.tokenizer.pad_token_id, padding_side)
        lengths = torch.tensor([len(r) for r in rows])
        response = None if any(s is None for s in starts) else torch.tensor(starts)
        return Encoded(ids, mask, RowLayout(prompt_len=lengths, response_start=response)).to(self.device)

    def _encoded(self, prompts: Sequence[Prompt] | Encoded) -> Encoded:
        """``prompts`` encoded (as given if already), checked against the context window."""
        enc = prompts if isinstance(prompts, Encoded) else self.encode(prompts)
        self.check_context(enc)
        return enc

    def _layers(self, layers: Sequence[int] | str | int) -> list[int]:
        return resolve_layers(layers, self.n_layers)

    def intervention(
        self,
        layer: int,
        vector: Tensor,
        coefficient: float | Sequence[float] | Tensor = 1.0,
        positions="all",
        operation: str = "add",
        relative: bool = False,
    ) -> Intervention:
        """An ``Intervention``; with ``relative=True`` the added vector's norm is ``coefficient`` x the layer's
        mean residual norm (so one coefficient means the same on models whose residual scales differ)."""
        vector = torch.as_tensor(vector, dtype=torch.float32)
        if relative:
            index = resolve_layer(layer, self.n_layers)
            scale = relative_scale(vector, float(self.residual_norms()[index]), f"layer {index}")
            coefficient = torch.as_tensor(coefficient, dtype=torch.float64) * scale
            coefficient = float(coefficient) if coefficient.dim() == 0 else coefficient
        return Intervention(layer, vector, coefficient, positions, operation)

    def check_context(self, enc: Encoded, extra: int = 0) -> None:
        """Raise a ValueError before any compute if a prompt of ``enc`` (plus ``extra`` new tokens) does not fit the
        context window."""
        self.check_context_length(int(enc.layout.prompt_len.max()), extra)

    def check_context_length(self, n_tokens: int, new_tokens: int = 0) -> None:
        """Raise a ValueError if ``n_tokens`` (plus ``new_tokens`` to generate) exceeds the model's context window."""
        limit = self.context_limit
        if limit is None or n_tokens + new_tokens <= limit:
            return
        if new_tokens:
            raise ValueError(
                f"a prompt has {n_tokens} tokens and max_new_tokens={new_tokens} asks for {n_tokens + new_tokens} in "
                f"all, but {self.name} takes at most {limit}; lower max_new_tokens or shorten the prompt"
            )
        raise ValueError(
            f"a prompt has {n_tokens} tokens but {self.name} takes at most {limit}; shorten the prompt or "
            "the system prompt variant"
        )
