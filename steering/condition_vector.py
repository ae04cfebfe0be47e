"""The positive-control direction: how the model's residual stream differs between monitored and unmonitored.

At the forced-choice answer position (the scorer's own prompts, both option orders so a letter direction
cancels), ``mean(monitored) - mean(unmonitored)`` per layer. On a model whose gap runs through the condition cue,
steering along it must move the gap: a sweep that cannot move the gap with this direction cannot see a driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from steering.backends.protocol import Backend
from steering.compliance import BASELINE, Conversation, ForcedChoiceScorer, Readout
from steering.hooks import resolve_layers
from steering.questions import Question
from steering.scenario import CONDITIONS
from steering.vectors import VectorSet
from steering.vectors.extract import normalize_vector


def condition_vector(
    model: Backend,
    questions: Sequence[Question],
    layers: str | int | Sequence[int] = "all",
    variant: str = "base",
    setting: str = "animal_welfare",
    normalize: str = "unit",
    name: str = "condition",
    progress: bool = False,
) -> VectorSet:
    """``mean(monitored) - mean(unmonitored)`` residual at the answer position over ``questions`` x both orders.

    One scoring pass per conversation with the prefix KV cache reused (as forced choice runs), reading the
    residual at every layer of ``layers`` in that pass.
    """
    questions = list(questions)
    if not questions:
        raise ValueError("no questions to contrast the conditions on; pass at least one")
    layers = resolve_layers(layers, model.n_layers)
    scorer = ForcedChoiceScorer(model, setting)
    convs = [Conversation(q, c, order) for q in questions for c in CONDITIONS for order in (0, 1)]
    sums = {c: {layer: torch.zeros(model.d_model, dtype=torch.float64) for layer in layers} for c in CONDITIONS}
    readout = Readout(dict.fromkeys(layers), {})
    for conv, _, reads in scorer.score_conversations(variant, convs, [BASELINE], progress=progress, readout=readout):
        for layer in layers:
            sums[conv.condition][layer] += reads[layer][0].double()
    n = 2 * len(questions)
    norms = model.residual_norms() if normalize == "residual" else None
    vectors = {}
    for layer in layers:
        raw = ((sums["monitored"][layer] - sums["unmonitored"][layer]) / n).float()
        vectors[layer] = normalize_vector(raw, normalize, None if norms is None else float(norms[layer]), layer)
    digest = hashlib.sha256(
        json.dumps([setting, variant, [q.__dict__ for q in questions]], sort_keys=True).encode()
    ).hexdigest()
    return VectorSet(
        driver=name,
        model=model.name,
        method="condition_mean_diff",
        position="answer",
        normalized=normalize,
        d_model=int(model.d_model),
        n_pairs=n,
        dataset_sha256=digest,
        vectors=vectors,
    )
