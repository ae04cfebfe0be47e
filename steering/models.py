"""Load a causal LM and wrap it with what steering needs: layers, d_model, chat formatting, residual norms."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from steering.hooks import (
    Intervention,
    RowLayout,
    capture,
    find_layers,
    find_layers_path,
    mean_norms,
    model_d_model,
    steer,
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


class SteeringModel:
    """A Hugging Face causal LM plus its tokenizer, decoder blocks and steering helpers.

    Backends other than plain transformers (TransformerLens, nnsight) wrap the same object; see ``backend``.
    """

    backend = "hf"

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None, layers_path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.layers_path = find_layers_path(model, layers_path)
        self.layers = find_layers(model, self.layers_path)
        self.n_layers = len(self.layers)
        self.d_model = model_d_model(model)
        if self.d_model is None:
            raise ValueError("could not read d_model (hidden_size) from the model config")
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._norms: Tensor | None = None

    def __repr__(self) -> str:
        return f"SteeringModel({self.name!r}, layers={self.n_layers}, d_model={self.d_model}, backend={self.backend!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

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

    def encode(self, prompts: Sequence[Prompt] | Prompt, padding_side: str = "left") -> Encoded:
        """Tokenize strings or chat conversations into a padded batch with its ``RowLayout``.

        A conversation gets the generation prompt (assistant header); its ``response_start`` is where that
        header begins, so ``positions="response"`` covers the header and everything the model writes after it.
        """
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
                rows.append(self._ids(self.format_chat(prompt, add_generation_prompt=True)))
                starts.append(len(self._ids(self.format_chat(prompt, add_generation_prompt=False))))
        return self._pad(rows, starts, padding_side)

    def _pad(self, rows: list[list[int]], starts: list[int | None], padding_side: str) -> Encoded:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
        lengths = torch.tensor([len(r) for r in rows])
        response = None if any(s is None for s in starts) else torch.tensor(starts)
        return Encoded(ids, mask, RowLayout(prompt_len=lengths, response_start=response)).to(self.device)

    # ---- residual stream ----------------------------------------------------------------------------------
    def capture(self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at="last"):
        """Residual stream ``{layer: [B, d]}`` at ``layers`` and positions ``at`` (see ``steering.hooks.At``)."""
        enc = prompts if isinstance(prompts, Encoded) else self.encode(prompts)
        layers = range(self.n_layers) if layers == "all" else layers
        return capture(self.model, enc.input_ids, enc.attention_mask, layers, at, self.layers_path)

    def residual_norms(self) -> Tensor:
        """Mean L2 norm of the residual stream per layer [n_layers] on fixed neutral text (first token skipped)."""
        if self._norms is None:
            enc = self.encode(list(NORM_TEXTS))
            self._norms = mean_norms(self.model, enc.input_ids, enc.attention_mask, self.layers_path)
        return self._norms

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
            if vector.dim() != 1 or float(vector.norm()) == 0.0:
                raise ValueError("relative coefficients need a non-zero [d_model] vector")
            scale = float(self.residual_norms()[layer]) / float(vector.norm())
            coefficient = torch.as_tensor(coefficient, dtype=torch.float32) * scale
            coefficient = float(coefficient) if coefficient.dim() == 0 else coefficient
        return Intervention(layer, vector, coefficient, positions, operation)

    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every forward pass inside is steered; hooks are removed on exit and on exceptions."""
        with steer(self.model, interventions, layout, self.layers_path) as tracker:
            yield tracker

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
        enc = self.encode(prompts)
        self.check_context(enc)
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self.steer(list(interventions), enc.layout):
            out = self.model.generate(**enc.inputs, **kwargs)
        new = out[:, enc.input_ids.shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def check_context(self, enc: Encoded, extra: int = 0) -> None:
        """Raise a ValueError before any compute if a prompt of ``enc`` does not fit the context window."""
        self.check_context_length(int(enc.layout.prompt_len.max()) + extra)

    def check_context_length(self, n_tokens: int) -> None:
        """Raise a ValueError if ``n_tokens`` exceeds the model's context window."""
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        limit = limit or getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
        if limit is not None and n_tokens > limit:
            raise ValueError(
                f"a prompt has {n_tokens} tokens but {self.name} takes at most {limit}; shorten the prompt or "
                "the system prompt variant"
            )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'") from None


def load_model(
    spec: str | Path = "default",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    backend: str = "hf",
    trust_remote_code: bool = False,
    layers_path: str | None = None,
) -> SteeringModel:
    """Load a causal LM: a hub id, a local folder, a ``.gguf`` file, or ``"default"`` (the offline default model).

    ``device="auto"`` spreads a large model over the available GPUs (``device_map="auto"``). Remote code runs
    only with ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering.default_model import DEFAULT_NAME, fetch_default_model

    name = str(spec)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if name == "default":
        source, name = fetch_default_model(), DEFAULT_NAME
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"GGUF file {path} does not exist; check the path")
        source, kwargs["gguf_file"] = path.parent, path.name
    else:
        source = Path(name).expanduser() if Path(name).expanduser().exists() else name
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model_kwargs = dict(kwargs, dtype=_resolve_dtype(dtype))
    if device == "auto":
        model_kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    wrapped = SteeringModel(model, tokenizer, name=name, layers_path=layers_path)
    if backend != "hf":
        from steering.backends import wrap_backend

        wrapped = wrap_backend(wrapped, backend)
    return wrapped
