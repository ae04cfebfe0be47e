"""Extract one steering vector per layer from contrast pairs, all layers from one forward pass per batch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from steering.hooks import At, resolve_layers

from .methods import Method, accepts_groups, get_method
from .pairs import ContrastPair, pairs_sha256
from .vectorset import VectorSet

READ_POSITIONS = ("answer", "last", "mean")  # where extraction reads each text (not where steering acts)
NORMALIZATIONS = ("unit", "none", "residual")


class ChatModel(Protocol):
    """What extraction needs from a model (``steering.SteeringModel`` has it all)."""

    name: str
    d_model: int
    n_layers: int
    has_chat_template: bool

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str: ...
    def encode(self, prompts: Sequence[str], padding_side: str = "left") -> Any: ...
    def capture(self, prompts: Any, layers: Sequence[int], at: Any = "last") -> dict[int, Tensor]: ...
    def residual_norms(self) -> Tensor: ...


def pair_texts(model: ChatModel, pair: ContrastPair) -> tuple[str, str, str]:
    """(prefix, positive text, negative text): the prompt in the chat template (with the assistant header), or
    ``prompt + "\\n"`` without one, followed by each completion."""
    if model.has_chat_template:
        prefix = model.format_chat([{"role": "user", "content": pair.prompt}])
    else:
        prefix = pair.prompt + "\n"
    return prefix, prefix + pair.positive, prefix + pair.negative


def _row_ids(enc: Any) -> list[list[int]]:
    """Unpadded token ids of each row of an encoded batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids.cpu(), enc.attention_mask.cpu())]


def completion_span(prefix_ids: list[int], full_ids: list[int]) -> tuple[int, int]:
    """Half-open token span (start, end) of the completion in ``full_ids``: what follows the longest common prefix
    with ``prefix_ids`` (a token merged across the boundary counts as completion), minus any trailing special
    tokens both encodings share (e.g. an appended EOS)."""
    start = 0
    while start < min(len(prefix_ids), len(full_ids)) and prefix_ids[start] == full_ids[start]:
        start += 1
    tail = 0
    while (
        tail < len(prefix_ids) - start
        and tail < len(full_ids) - start - 1
        and prefix_ids[-1 - tail] == full_ids[-1 - tail]
    ):
        tail += 1
    end = len(full_ids) - tail
    if end <= start:
        raise ValueError("a completion encodes to no tokens of its own; use a non-empty completion")
    return start, end


def collect_activations(
    model: ChatModel,
    pairs: Sequence[ContrastPair],
    layers: str | int | Sequence[int] = "all",
    position: str = "answer",
    batch_size: int = 16,
    progress: bool = True,
    padding_side: str = "left",
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Residual-stream activations of positives and negatives: ``({layer: [N, d]}, {layer: [N, d]})`` float32 CPU.

    ``position``: "answer" (the completion's last token), "last" (the text's last token) or "mean" (mean over the
    completion's tokens). Each batch holds ``batch_size`` pairs, positives and negatives together, in one forward
    pass that stops after the deepest requested layer; pairs are batched by length and returned in input order.
    """
    from tqdm.auto import tqdm

    pairs = _check_pairs(pairs)
    if position not in READ_POSITIONS:
        raise ValueError(f"unknown read position {position!r}; use one of {', '.join(READ_POSITIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = resolve_layers(layers, int(model.n_layers))
    texts = [pair_texts(model, p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -max(len(texts[i][1]), len(texts[i][2])))
    pos_out = {layer: torch.empty(len(pairs), model.d_model) for layer in layers}
    neg_out = {layer: torch.empty(len(pairs), model.d_model) for layer in layers}
    starts = range(0, len(order), batch_size)
    for begin in tqdm(starts, desc="extract", unit="batch", disable=not progress):
        index = order[begin : begin + batch_size]
        b = len(index)
        enc = model.encode([texts[i][1] for i in index] + [texts[i][2] for i in index], padding_side=padding_side)
        at = _positions(model, enc, [texts[i][0] for i in index], position)
        acts = model.capture(enc, layers, at)
        rows = torch.as_tensor(index)
        for layer in layers:
            act = acts[layer].detach().to("cpu", torch.float32)  # [2b, d]
            pos_out[layer][rows] = act[:b]
            neg_out[layer][rows] = act[b:]
    return pos_out, neg_out


def _positions(model: ChatModel, enc: Any, prefixes: list[str], position: str) -> At:
    """Where to read each row of a batch of ``2b`` texts (b positives then b negatives) sharing ``b`` prefixes."""
    full = _row_ids(enc)
    pre = _row_ids(model.encode(prefixes))
    spans = [completion_span(pre[r % len(pre)], ids) for r, ids in enumerate(full)]
    if position == "last":
        return At(index=torch.full((len(full),), -1))
    if position == "answer":
        return At(index=torch.tensor([end - 1 for _, end in spans]))
    return At.mean([s for s, _ in spans], [e for _, e in spans])


def _check_pairs(pairs: Sequence[ContrastPair]) -> list[ContrastPair]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no contrast pairs to extract from; load some with load_driver(...) or load_pairs(...)")
    bad = [type(p).__name__ for p in pairs if not isinstance(p, ContrastPair)]
    if bad:
        raise ValueError(f"pairs must be ContrastPair objects, got {bad[0]}; build them with ContrastPair(...)")
    return pairs


def normalize_vector(vector: Tensor, mode: str, residual_norm: float | None = None, layer: int | None = None) -> Tensor:
    """``vector`` [d] unchanged ("none"), at unit norm ("unit"), or at the layer's mean residual norm ("residual")."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={mode!r}; use one of {', '.join(NORMALIZATIONS)}")
    if mode == "none":
        return vector
    norm = float(vector.norm())
    if norm == 0.0:
        raise ValueError(f"the vector of layer {layer} is zero, so it cannot be normalised; use normalize='none'")
    target = 1.0 if mode == "unit" else float(residual_norm)
    return (vector.double() * (target / norm)).float()


def balance_groups(pairs: Sequence[ContrastPair]) -> list[str] | None:
    """One group label per pair for balanced extraction (``ContrastPair.balance_group``: the explicit ``group``,
    else the positive answer's letter), or None when there is nothing to balance (no labels, or a single group).
    Pairs without a label form a group of their own."""
    labels = [p.balance_group for p in pairs]
    if all(label is None for label in labels):
        return None
    labels = ["" if label is None else label for label in labels]
    return labels if len(set(labels)) > 1 else None


def _default_sha(pairs: list[ContrastPair], driver: str | None) -> str:
    """The driver file's hash when ``pairs`` are exactly one split of that packaged driver, else the pairs' hash."""
    from .datasets import DRIVERS, dataset_sha256, load_driver

    if driver in DRIVERS:
        for split in ("train", "all", "test"):
            if load_driver(driver, split) == pairs:
                return dataset_sha256(driver)
    return pairs_sha256(pairs)


def extract(
    model: ChatModel,
    pairs: Sequence[ContrastPair],
    layers: str | int | Sequence[int] = "all",
    method: str | Method = "mean_diff",
    position: str = "answer",
    normalize: str = "unit",
    batch_size: int = 16,
    driver: str | None = None,
    progress: bool = True,
    padding_side: str = "left",
    dataset_sha256: str | None = None,
    balance: bool = True,
) -> VectorSet:
    """One vector per layer [d_model] from contrast pairs: ``method(pos [N, d], neg [N, d])`` then ``normalize``.

    ``balance`` (default): when the pairs fall into groups (``balance_groups``: on A/B data, whether the positive
    answer is (A) or (B)), the method weighs each group equally (``groups=`` keyword, see ``vectors.methods``), so
    the A-minus-B letter direction cancels even when the groups are unequal; the set's ``method`` then reads e.g.
    ``"mean_diff+balanced"``. ``balance=False`` gives the plain, pair-weighted method.

    ``dataset_sha256`` defaults to the driver file's hash when ``pairs`` are a split of that packaged driver, else
    to a hash of the pairs themselves.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
    method_name, fn = get_method(method)
    pairs = _check_pairs(pairs)
    layers = resolve_layers(layers, int(model.n_layers))
    groups = balance_groups(pairs) if balance else None
    if groups is not None and not accepts_groups(fn):
        warnings.warn(
            f"method {method_name!r} takes no groups= keyword, so the vectors are not balanced over answer letters; "
            "add a groups=None keyword to the method (see steering.vectors.methods) or pass balance=False",
            stacklevel=2,
        )
        groups = None
    kwargs = {} if groups is None else {"groups": groups}
    pos, neg = collect_activations(model, pairs, layers, position, batch_size, progress, padding_side)
    norms = model.residual_norms() if normalize == "residual" else None
    vectors = {}
    for layer in layers:
        raw = fn(pos[layer], neg[layer], **kwargs).detach().to("cpu", torch.float32)
        vectors[layer] = normalize_vector(raw, normalize, None if norms is None else float(norms[layer]), layer)
    return VectorSet(
        driver=driver or "custom",
        model=model.name,
        method=method_name + ("+balanced" if groups is not None else ""),
        position=position,
        normalized=normalize,
        d_model=int(model.d_model),
        n_pairs=len(pairs),
        dataset_sha256=dataset_sha256 or _default_sha(pairs, driver),
        vectors=vectors,
    )
