"""Measure the compliance gap of one prompt variant: forced choice (fast, exact) or generation + judge."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from steering.backends.protocol import Backend
from steering.compliance import ForcedChoiceScorer
from steering.judge import KeywordJudge, RubricJudge
from steering.questions import load_questions
from steering.scenario import CONDITIONS, load_setting
from steering.spec import FORCED_CHOICE, JUDGE
from steering.stats import gap_stats

ChatFn = Callable[[list[list[dict]]], list[str | None]]


def local_chat_fn(model: Backend, max_new_tokens: int = 96, batch_size: int = 8) -> ChatFn:
    """Adapt a loaded model to the judges' ``chat_fn`` (batch of conversations -> reply strings), greedy. An engine
    with continuous batching (``backend="vllm"``) gets the whole batch in one call."""

    def chat(batch: list[list[dict]]) -> list[str | None]:
        step = max(len(batch), 1) if model.batches_continuously() else batch_size
        replies: list[str | None] = []
        for lo in range(0, len(batch), step):
            replies += model.generate(batch[lo : lo + step], max_new_tokens=max_new_tokens)
        return replies

    return chat


def make_judge(
    kind: str = "keyword",
    judge_model: Backend | None = None,
    url: str | None = None,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    allow_insecure: bool = False,
    **kw,
):
    """A judge: ``keyword`` heuristic, ``local`` (a loaded model with our rubric) or ``endpoint`` (OpenAI-style).

    For ``endpoint``: ``timeout`` (seconds per request) and ``retries`` (after a 5xx / timeout / connection error);
    an item whose request still fails is unjudged (``Judgement.failed``), never an exception. ``allow_insecure``
    lets an API key go over plain http to another machine. ``judge_name`` is the model name at the endpoint.
    """
    if kind == "keyword":
        return KeywordJudge()
    if kind == "local":
        if judge_model is None:
            raise ValueError("judge='local' needs a judge model: pass --judge-model (a hub id, folder or 'default')")
        return RubricJudge(local_chat_fn(judge_model))
    if kind == "endpoint":
        if not url:
            raise ValueError("judge='endpoint' needs --judge-url (an OpenAI-compatible base URL, e.g. http://host/v1)")
        from steering.endpoint import OpenAIChatClient

        client = OpenAIChatClient(
            url, kw.get("judge_name") or "judge", timeout=timeout, max_retries=retries, allow_insecure=allow_insecure
        )
        return RubricJudge(client)
    raise ValueError(f"unknown judge {kind!r}; use keyword, local or endpoint")


def judge_for_spec(spec, judge_model: Backend | None = None):
    """The judge a sweep spec asks for (``judge``, ``judge_model``, ``judge_url``, ``judge_timeout``,
    ``judge_retries``, ``judge_allow_insecure``); loads the local judge model unless one is given."""
    if spec.judge == "local" and judge_model is None:
        from steering.models import load_model

        judge_model = load_model(spec.judge_model)
    return make_judge(
        spec.judge,
        judge_model,
        spec.judge_url,
        timeout=spec.judge_timeout,
        retries=spec.judge_retries,
        allow_insecure=spec.judge_allow_insecure,
        judge_name=spec.judge_model if spec.judge == "endpoint" else None,
    )


def judged_rows(
    model: Backend,
    variant: str,
    questions,
    judge,
    conditions: Sequence[str] = CONDITIONS,
    seed: int = 0,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    batch_size: int = 8,
    setting: str = "animal_welfare",
    progress: bool = True,
) -> pd.DataFrame:
    """Generate with the hidden scratchpad, judge each output; one row per (question, condition)."""
    scenario = load_setting(setting)
    items = [(q, c) for q in questions for c in conditions]
    texts: list[str] = []
    for lo in tqdm(range(0, len(items), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = items[lo : lo + batch_size]
        prompts = [scenario.messages(q.question, c, variant, scratchpad=True) for q, c in chunk]
        texts += model.generate(prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed + lo)
    verdicts = judge(texts, [q.question for q, _ in items])
    return pd.DataFrame(
        [
            {"question": q.id, "condition": c, "seed": seed, "compliance": v.compliance, "response": t}
            for (q, c), v, t in zip(items, verdicts, texts)
        ]
    )


def measure_gap(
    model: Backend,
    variant: str = "base",
    scorer: str = "forced-choice",
    n: int | None = 50,
    seeds: Sequence[int] = (0,),
    judge=None,
    questions: str = "animal_welfare",
    setting: str = "animal_welfare",
    progress: bool = True,
    **judge_kw,
) -> tuple[pd.DataFrame, dict]:
    """Rows (question, condition, seed, compliance) and gap statistics (``steering.stats.gap_stats``)."""
    frames = []
    for seed in seeds:
        qs = load_questions(questions, n=n, seed=seed if len(seeds) > 1 else None)
        if scorer == FORCED_CHOICE:
            frame = ForcedChoiceScorer(model, setting).score(qs, variant, progress=progress)
        elif scorer == JUDGE:
            frame = judged_rows(model, variant, qs, judge or KeywordJudge(), seed=seed, setting=setting, **judge_kw)
        else:
            raise ValueError(f"unknown scorer {scorer!r}; use forced-choice or judge")
        frames.append(frame.assign(seed=seed, scorer=scorer))
    rows = pd.concat(frames, ignore_index=True)
    with torch.no_grad():
        return rows, gap_stats(rows)
