"""``SteeringModel``: a causal LM with what steering needs (layers, d_model, chat formatting, residual norms) and
the steering API every backend shares (``encode``, ``capture``, ``intervention``, ``steer``, ``generate``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steering.coefficients import relative_scale
from steering.hooks import (
    Intervention,
    Plan,
    RowLayout,
    capture,
    drive,
    find_layers,
    find_layers_path,
    find_stack,
    mean_norms,
    model_d_model,
    read_last,
    resolve_layer,
    resolve_layers,
)

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
    ``residual_norms``, ``capture``, ``steer`` and ``generate``.
    """

    backend = "hf"
    source = None  # what ``load_model`` loaded the model from (a folder, .gguf file or hub id); None: built in memory
    has_forward_pass = True  # ``model.model(...)`` runs a forward pass (the forced-choice scorer needs it)
    continuous_batching = False  # True: one call with many rows is cheaper than several small calls

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


class SteeringModel(TextModel):
    """A Hugging Face causal LM plus its tokenizer, decoder blocks and steering helpers.

    Backends other than plain transformers (TransformerLens, nnsight) wrap the same object; see ``backend``.
    """

    backend = "hf"
    has_readouts = True  # generate_with_readouts: driver projections read while generating

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None, layers_path: str | None = None):
        self.model = model
        self.layers_path = find_layers_path(model, layers_path)
        self.layers = find_layers(model, self.layers_path)
        self.stack = find_stack(model, self.layers_path)  # receives the mask, position ids and KV cache
        d_model = model_d_model(model)
        if d_model is None:
            raise ValueError("could not read d_model (hidden_size) from the model config")
        name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self._init_text(tokenizer, name, len(self.layers), d_model)

    def __repr__(self) -> str:
        return f"SteeringModel({self.name!r}, layers={self.n_layers}, d_model={self.d_model}, backend={self.backend!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_limit(self) -> int | None:
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        return limit or getattr(getattr(config, "text_config", None), "max_position_embeddings", None)

    # ---- residual stream ----------------------------------------------------------------------------------
    def capture(self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at="last"):
        """Residual stream ``{layer: [B, d]}`` at ``layers`` and positions ``at`` (see ``steering.hooks.At``)."""
        enc = self._encoded(prompts)
        return capture(self.model, enc.input_ids, enc.attention_mask, self._layers(layers), at, self.layers_path)

    def residual_norms(self) -> Tensor:
        """Mean L2 norm of the residual stream per layer [n_layers] on fixed neutral text (first token skipped)."""
        if self._norms is None:
            enc = self.encode(list(NORM_TEXTS))
            self._norms = mean_norms(self.model, enc.input_ids, enc.attention_mask, self.layers_path)
        return self._norms

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every forward pass inside is steered; hooks are removed on exit and on exceptions.

        Yields the position tracker (``.positions``: row positions of the last forward call). Only forward passes of
        the thread (or asyncio task) that entered the block are steered; explicit ranges that touched no token raise
        a ``ValueError`` at the end of the block."""
        plan = Plan(interventions, self.n_layers, self.d_model, layout)
        with drive(self.model, plan, self.layers, self.stack) as tracker:
            yield tracker

    @contextmanager
    def readout(self, directions: Mapping[int, Tensor | None]) -> Iterator[dict[int, Tensor]]:
        """Context manager: each forward pass inside records ``{layer: [B, k]}``, the residual stream at the last
        column projected on the rows of ``directions[layer]`` ([k, d], on the model's device and dtype; ``None``:
        the whole residual ``[B, d]``). Enter it inside ``steer(...)`` to read the steered stream."""
        with read_last(self.layers, directions) as out:
            yield out

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        max_new_tokens: int = 64,
        interventions: Sequence[Intervention] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Complete each prompt (steered by ``interventions``, if any); returns the new text per prompt."""
        new, _ = self._generate(prompts, max_new_tokens, interventions, do_sample, temperature, seed)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def generate_with_readouts(
        self,
        prompts: Sequence[Prompt] | Prompt,
        directions: Mapping[int, Tensor],
        max_new_tokens: int = 64,
        interventions: Sequence[Intervention] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> tuple[list[str], list[list[int]], dict[int, Tensor]]:
        """``generate`` that also reads ``directions`` ({layer: [k, d]}) at every generated token, in the same
        forward passes: (texts, new token ids per row, ``{layer: [B, new tokens, k]}`` where ``[:, j]`` is the
        residual of new token ``j`` projected on the rows; the last token, never fed back, is NaN)."""
        placed = {layer: rows.to(device=self.device, dtype=self.dtype) for layer, rows in directions.items()}
        new, steps = self._generate(prompts, max_new_tokens, interventions, do_sample, temperature, seed, placed)
        width = new.shape[1]
        reads = {}
        for layer, per_call in steps.items():
            fed = torch.stack(per_call[1 : width + 1], dim=1).float().cpu() if len(per_call) > 1 else None
            values = torch.full((new.shape[0], width, placed[layer].shape[0]), float("nan"))
            if fed is not None:
                values[:, : fed.shape[1]] = fed
            reads[layer] = values
        ids = new.cpu().tolist()  # token j of a row <-> reads[layer][row, j] (rows that stop early end in padding)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True), ids, reads

    def _generate(self, prompts, max_new_tokens, interventions, do_sample, temperature, seed, directions=None):
        """New token ids [B, new] (and, with ``directions``, the per-call readouts) of one ``generate`` call."""
        enc = self.encode(prompts)
        self.check_context(enc, int(max_new_tokens))
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        reading = read_last(self.layers, directions, history=True) if directions else contextlib.nullcontext({})
        with self.steer(list(interventions), enc.layout), reading as steps:
            out = self.model.generate(**enc.inputs, **kwargs)
        return out[:, enc.input_ids.shape[1] :], steps
