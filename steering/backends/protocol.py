"""The backend contract: what every model object ``load_model`` / ``wrap`` returns can do, whatever runs it.

``Backend`` is the one type consumers (scorers, sweeps, judges, extraction, the studies) are written against. Its
capabilities are methods, never flags or backend-name checks: a backend that cannot do something raises
``Unsupported`` (a ``ValueError`` naming what to use instead) from the method, and says so up front through a
class-level question (``can_prefill``, ``batches_continuously``, ``reads_while_generating``) that callers can ask
before a model is loaded (``steering.backends.model_class(name)``).

Adding a backend: one package under ``steering/backends/`` (its model class, a ``TextModel`` that meets this
protocol, and its hook adapter), plus its line in ``steering.backends.REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from steering.backends.base import Encoded, Prompt
from steering.backends.errors import Unsupported, UnsupportedAttribute
from steering.hooks import Intervention, RowLayout

Pass = tuple[int, Sequence[Intervention], RowLayout]  # (cells per row m, interventions, layout of the k x m rows)


@runtime_checkable
class ScoringSession(Protocol):
    """A prefix-cached scoring session (``Backend.prefill``): the KV cache of one shared prefix, reused by every row
    it scores."""

    tokens_processed: int

    def score(
        self,
        rows: Sequence[Sequence[int]],
        begins: Sequence[int],
        passes: Sequence[Pass],
        reduce: Callable[[Tensor], Tensor],
        readout: Mapping[int, Tensor | None] | None = None,
    ) -> list[tuple[Tensor, dict[int, Tensor]]]:
        """Per pass ``(m, interventions, layout)``: ``reduce`` of the last-position logits of every row x ``m``
        (rows start with the prefix; ``begins[j]``: where row ``j``'s scored suffix starts) under those
        interventions, and the readouts ``{layer: [rows x m, K]}`` read in the same forward."""
        ...


@runtime_checkable
class Backend(Protocol):
    """The steering API of a loaded model on any backend (``hf``, ``transformer_lens``, ``nnsight``, ``vllm``)."""

    backend: str  # the registry name of the backend that runs it
    name: str
    tokenizer: Any
    n_layers: int
    d_model: int
    source: Any  # what it was loaded from (a folder, a .gguf file, a hub id), or None

    @property
    def device(self) -> Any: ...

    @property
    def context_limit(self) -> int | None: ...

    @property
    def dtype(self) -> Any: ...

    # ---- text ----------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt] | Prompt, padding_side: str = "left") -> Encoded: ...

    def chat_ids_many(self, chats: Sequence[Sequence[dict]], suffix: str = "") -> list[tuple[list[int], int]]: ...

    def check_context_length(self, n_tokens: int, new_tokens: int = 0) -> None: ...

    def intervention(
        self,
        layer: int,
        vector: Tensor,
        coefficient: float | Sequence[float] | Tensor = 1.0,
        positions: Any = "all",
        operation: str = "add",
        relative: bool = False,
    ) -> Intervention: ...

    # ---- the residual stream -------------------------------------------------------------------------------
    def capture(
        self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at: Any = "last"
    ) -> dict[int, Tensor]: ...

    def steer(
        self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None
    ) -> AbstractContextManager: ...

    def residual_norms(self) -> Tensor: ...

    # ---- generation and scoring ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        max_new_tokens: int = 64,
        interventions: Sequence[Intervention] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[str]: ...

    def prefill(self, ids: Sequence[int] | None) -> ScoringSession:
        """A scoring session over the cached prefix ``ids`` (``None``: whole prompts); ``Unsupported`` where the
        backend has no forward pass to score with."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes (sizes scoring batches); ``Unsupported`` without ``prefill``."""
        ...

    def sliding_window(self) -> int | None:
        """The model's sliding attention window, if any (padding inside a scored row must not exceed it)."""
        ...

    # ---- capabilities (class-level: answerable before a model is loaded) -----------------------------------
    @classmethod
    def can_prefill(cls) -> bool:
        """Whether ``prefill`` works (the forced-choice scorer needs it)."""
        ...

    @classmethod
    def batches_continuously(cls) -> bool:
        """Whether one call with many rows is cheaper than several small calls (an engine with continuous
        batching: give it whole batches)."""
        ...

    @classmethod
    def reads_while_generating(cls) -> bool:
        """Whether ``generate_with_readouts`` (driver projections read at every generated token, in the same
        forward passes) is verified on this backend; judged sweeps read while generating only where it is."""
        ...


__all__ = ["Backend", "Pass", "ScoringSession", "Unsupported", "UnsupportedAttribute"]
