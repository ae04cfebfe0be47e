"""Extract one steering vector per layer from contrast pairs, all layers from one forward pass per batch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    """Unpadded token ids of each row of an encoded batch (one device-to-host copy)."""
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


# Tokens (rows x padded length) of one extraction batch when ``max_batch_tokens`` is not given. A CPU gains
# little from larger batches (this holds the 16 pairs of up to ~250 tokens a batch held before); a GPU needs a few
# thousand tokens per pass to be busy, and several passes so the host prepares the next batch while one runs.
CPU_EXTRACT_TOKENS = 8192
GPU_EXTRACT_TOKENS = 16384
GPU_MEMORY_SHARE = 0.25
ACTIVATION_FACTOR = 12  # transient bytes per token of one block ~ this x d_model x element size (MLP included)


def default_extract_tokens(model: ChatModel) -> int:
    """Token budget of one extraction batch on ``model``'s device (see ``GPU_EXTRACT_TOKENS``)."""
    device = _device(model)
    if device is None or device.type != "cuda":
        return CPU_EXTRACT_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = getattr(getattr(model, "dtype", None), "itemsize", 4)
    fits = int(GPU_MEMORY_SHARE * free / (ACTIVATION_FACTOR * int(model.d_model) * itemsize))
    return max(CPU_EXTRACT_TOKENS, min(GPU_EXTRACT_TOKENS, fits))


def _device(model: ChatModel) -> torch.device | None:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else None


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Indices of pairs per batch: longest first, each batch at most ``max_batch_tokens`` padded tokens
    (2 texts x pairs x longest text) and at most ``batch_size`` pairs. ``lengths``: tokens of each pair's longer
    text. A pair longer than the budget forms a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else []
        room = batch_size is None or len(batch) < batch_size
        if batch and room and 2 * (len(batch) + 1) * lengths[batch[0]] <= max_batch_tokens:  # [0]: its longest
            batch.append(i)
        else:
            batches.append([i])
    return batches


def _token_ids(model: ChatModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` as ``model.encode`` makes them, on the host: the tokenizer in one batched call where
    the model has one (``SteeringModel``: special tokens only without a chat template), else a device round trip."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and callable(tokenizer):
        return tokenizer(list(texts), add_special_tokens=not model.has_chat_template)["input_ids"]
    return _row_ids(model.encode(list(texts)))


def _at(spans: Sequence[tuple[int, int]], position: str) -> At:
    """Where to read each row, from its completion span."""
    if position == "last":
        return At(index=torch.full((len(spans),), -1))
    if position == "answer":
        return At(index=torch.tensor([end - 1 for _, end in spans]))
    return At.mean([s for s, _ in spans], [e for _, e in spans])


def collect_activations(
    model: ChatModel,
    pairs: Sequence[ContrastPair],
    layers: str | int | Sequence[int] = "all",
    position: str = "answer",
    batch_size: int | None = None,
    progress: bool = True,
    padding_side: str = "left",
    max_batch_tokens: int | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Residual-stream activations of positives and negatives: ``({layer: [N, d]}, {layer: [N, d]})`` float32 CPU.

    ``position``: "answer" (the completion's last token), "last" (the text's last token) or "mean" (mean over the
    completion's tokens). Pairs are tokenized once, sorted by length and batched by tokens: a batch holds at most
    ``max_batch_tokens`` padded tokens (default: ``default_extract_tokens``, sized to the device) and at most
    ``batch_size`` pairs if given, positives and negatives together in one forward pass that stops after the
    deepest requested layer. The next batch is encoded on a helper thread while this one runs, and activations come
    back to the host once at the end (no per-batch wait for the device); results are in input order.
    """
    from tqdm.auto import tqdm

    pairs = _check_pairs(pairs)
    if position not in READ_POSITIONS:
        raise ValueError(f"unknown read position {position!r}; use one of {', '.join(READ_POSITIONS)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for no cap), got {batch_size}")
    budget = default_extract_tokens(model) if max_batch_tokens is None else max_batch_tokens
    if budget < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {budget}")
    layers = resolve_layers(layers, int(model.n_layers))
    texts = [pair_texts(model, p) for p in pairs]
    n = len(pairs)
    host = _token_ids(model, [t[1] for t in texts] + [t[2] for t in texts] + [t[0] for t in texts])
    batches = plan_batches([max(len(host[i]), len(host[n + i])) for i in range(n)], budget, batch_size)

    def encode(index: list[int]) -> Any:
        return model.encode([texts[i][1] for i in index] + [texts[i][2] for i in index], padding_side=padding_side)

    def spans(index: list[int]) -> list[tuple[int, int]]:
        rows = [host[i] for i in index] + [host[n + i] for i in index]
        return [completion_span(host[2 * n + index[r % len(index)]], ids) for r, ids in enumerate(rows)]

    results: list[tuple[list[int], Tensor]] = []
    copying: torch.device | None = None  # the CUDA device with device-to-host copies in flight
    bar = tqdm(total=len(batches), desc="extract", unit="batch", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encode, batches[0])
        for k, index in enumerate(batches):
            enc = pending.result()
            if k == 0 and _row_ids(enc) != [host[i] for i in index] + [host[n + i] for i in index]:
                host = _row_ids(model.encode([t[1] for t in texts] + [t[2] for t in texts] + [t[0] for t in texts]))
            if k + 1 < len(batches):
                pending = pool.submit(encode, batches[k + 1])  # tokenized while this batch runs
            acts = model.capture(enc, layers, _at(spans(index), position))
            stacked = torch.stack([acts[layer].detach() for layer in layers]).to(torch.float32)  # [L, 2b, d]
            copying = stacked.device if stacked.is_cuda else copying
            results.append((index, stacked.to("cpu", non_blocking=stacked.is_cuda)))
            bar.update()
    bar.close()
    if copying is not None:
        torch.cuda.synchronize(copying)  # the non-blocking copies above have landed
    pos_out = {layer: torch.empty(n, model.d_model) for layer in layers}
    neg_out = {layer: torch.empty(n, model.d_model) for layer in layers}
    for index, stacked in results:
        rows, b = torch.as_tensor(index), len(index)
        for j, layer in enumerate(layers):
            pos_out[layer][rows] = stacked[j, :b]
            neg_out[layer][rows] = stacked[j, b:]
    return pos_out, neg_out


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
    batch_size: int | None = None,
    driver: str | None = None,
    progress: bool = True,
    padding_side: str = "left",
    dataset_sha256: str | None = None,
    balance: bool = True,
    max_batch_tokens: int | None = None,
) -> VectorSet:
    """One vector per layer [d_model] from contrast pairs: ``method(pos [N, d], neg [N, d])`` then ``normalize``.

    ``balance`` (default): when the pairs fall into groups (``balance_groups``: on A/B data, whether the positive
    answer is (A) or (B)), the method weighs each group equally (``groups=`` keyword, see ``vectors.methods``), so
    the A-minus-B letter direction cancels even when the groups are unequal; the set's ``method`` then reads e.g.
    ``"mean_diff+balanced"``. ``balance=False`` gives the plain, pair-weighted method.

    ``dataset_sha256`` defaults to the driver file's hash when ``pairs`` are a split of that packaged driver, else
    to a hash of the pairs themselves. Batching (``max_batch_tokens``, ``batch_size``): see ``collect_activations``.
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
    pos, neg = collect_activations(
        model, pairs, layers, position, batch_size, progress, padding_side, max_batch_tokens=max_batch_tokens
    )
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
