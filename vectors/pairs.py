"""Contrast pairs: a shared prompt plus a positive and a negative completion."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SPLITS = ("train", "test")

_LETTER = re.compile(r"^\(([A-Za-z0-9])\)?$")


def answer_letter(completion: str) -> str | None:
    """The option letter of a lettered completion (``"(A"``, ``"(A)"``, ``" (b)"`` -> ``"A"`` / ``"B"``), else None."""
    match = _LETTER.match(completion.strip()) if isinstance(completion, str) else None
    return match.group(1).upper() if match else None


@dataclass(frozen=True)
class ContrastPair:
    """``prompt`` (the user turn) with a ``positive`` and a ``negative`` completion (the assistant's first tokens).

    CAA A/B pairs are one case: prompt = the question with its choices, positive = ``"(A"``, negative = ``"(B"``,
    so the last token of each completion is the answer letter; ``positive_letter`` / ``negative_letter`` read it.

    ``group`` (optional) labels the pair for balanced extraction; without it, a lettered pair's group is its
    positive letter (``balance_group``), so extraction averages the pairs whose positive answer is (A) and those
    whose positive answer is (B) equally and the letter direction cancels.
    """

    prompt: str
    positive: str
    negative: str
    id: str | None = None
    split: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "positive", "negative"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ContrastPair.{name} must be a non-empty string, got {value!r}")
        if self.positive == self.negative:
            raise ValueError(f"ContrastPair positive and negative are both {self.positive!r}; they must differ")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"ContrastPair.split must be one of {SPLITS} or None, got {self.split!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group.strip()):
            raise ValueError(f"ContrastPair.group must be a non-empty string or None, got {self.group!r}")

    @property
    def positive_letter(self) -> str | None:
        """The option letter of the positive completion (``"(B"`` -> ``"B"``), None when it is not lettered."""
        return answer_letter(self.positive)

    @property
    def negative_letter(self) -> str | None:
        """The option letter of the negative completion, None when it is not lettered."""
        return answer_letter(self.negative)

    @property
    def balance_group(self) -> str | None:
        """The group balanced extraction averages over: ``group`` if set, else the positive letter (or None)."""
        return self.group if self.group is not None else self.positive_letter


def answer_completion(answer: str) -> str:
    """An A/B answer as a completion whose last token is the letter: ``" (A)"`` / ``"(A)"`` -> ``"(A"``.

    Answers that are not a parenthesised letter (e.g. ``" Yes"``) are returned stripped.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"an answer must be a non-empty string, got {answer!r}")
    text = answer.strip()
    match = _LETTER.match(text)
    return f"({match.group(1)}" if match else text


def caa_pair(question: str, matching: str, not_matching: str, id: str | None = None, split: str | None = None):
    """A ``ContrastPair`` from a CAA / model-written-evals record (answers such as ``"(A)"`` or ``" (B)"``)."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    return ContrastPair(question, answer_completion(matching), answer_completion(not_matching), id=id, split=split)


def select_split(pairs: Sequence[ContrastPair], split: str) -> list[ContrastPair]:
    """Pairs of ``split`` ("train", "test" or "all"); a split on data without split labels is an error."""
    if split == "all":
        return list(pairs)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if pairs and all(p.split is None for p in pairs):
        raise ValueError(f"these pairs carry no split labels, so split={split!r} is undefined; pass split='all'")
    return [p for p in pairs if p.split == split]


def has_splits(pairs: Sequence[ContrastPair]) -> bool:
    """True when the pairs carry train / test labels."""
    return any(p.split is not None for p in pairs)


def pairs_sha256(pairs: Sequence[ContrastPair]) -> str:
    """SHA-256 of the pairs' content (canonical JSON, in order): identifies data that did not come from a file."""
    digest = hashlib.sha256()
    for pair in pairs:
        record = asdict(pair)
        if record["group"] is None:  # pairs without a group hash as they did before the field existed
            del record["group"]
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
