"""``SteeringModel``: the hf backend's model: a Hugging Face causal LM in this process, steered by forward hooks
(``steering.hooks.drive``, the reference driver of the hooks engine)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from steering.backends.base import NORM_TEXTS, Encoded, Prompt, TextModel
from steering.backends.hf.session import PrefixSession
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
)


class SteeringModel(TextModel):
    """A Hugging Face causal LM plus its tokenizer, decoder blocks and steering helpers.

    Backends other than plain transformers (TransformerLens, nnsight) wrap the same object; see ``backend``.
    """

    backend = "hf"

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

    # ---- scoring ------------------------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int] | None) -> PrefixSession:
        """A scoring session whose KV cache holds ``ids`` (one shared prefix, computed now); ``None``: a session
        that runs whole prompts. See ``steering.backends.hf.session``."""
        return PrefixSession(self, ids)

    @classmethod
    def can_prefill(cls) -> bool:
        return True

    # ---- conversion between the in-process backends (``steering.models.wrap_backend``) -----------------------
    def hf_module(self) -> nn.Module:
        """The Hugging Face model this object runs (shared by every in-process backend's wrapper)."""
        return self.model

    @classmethod
    def convert(cls, model: SteeringModel, eager_attention: bool = False) -> SteeringModel:
        """A model of this backend over ``model``'s Hugging Face module (shared, not copied)."""
        return SteeringModel(model.hf_module(), model.tokenizer, model.name, model.layers_path)

    @classmethod
    def reads_while_generating(cls) -> bool:
        return True  # verified on plain transformers (tests/test_readouts.py)

    def keeps_logits(self) -> bool:
        """Whether the forward takes ``logits_to_keep`` (then scoring computes the LM head at one position only)."""
        if getattr(self, "_logits_to_keep", None) is None:
            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep

    def sliding_window(self) -> int | None:
        """The model's sliding attention window, if its config declares one (and does not switch it off)."""
        config = self.model.config
        for cfg in (getattr(config, "text_config", None), config):
            if cfg is None or getattr(cfg, "use_sliding_window", True) is False:
                continue
            window = getattr(cfg, "sliding_window", None)
            if isinstance(window, int) and window > 0:
                return window
        return None

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes (all layers, keys and values)."""
        config = self.model.config
        config = getattr(config, "text_config", None) or config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or self.d_model // heads
        return 2 * self.n_layers * kv_heads * head_dim * self.dtype.itemsize

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
