"""Question sets: the packaged animal-welfare questions and loaders for outside JSONL / CSV sets.

Each question may carry a compliant and a refusing reference answer (the forced-choice scorer needs both);
request-only sets (helpful-only) load with `require_answers=False`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

FIELDS: tuple[str, ...] = ("id", "question", "compliant", "refusing", "topic")
_ANSWERS = ("compliant", "refusing")
_EXTENSIONS = (".jsonl", ".csv")


@dataclass(frozen=True)
class Question:
    """A question with reference answers: `compliant` follows the training objective, `refusing` does not."""

    id: str
    question: str
    compliant: str | None = None
    refusing: str | None = None
    topic: str = ""


def available_question_sets() -> list[str]:
    """Names of the question sets shipped with the package."""
    return sorted(p.name.removesuffix(".jsonl") for p in _data_dir().iterdir() if p.name.endswith(".jsonl"))


def load_questions(
    path_or_name: str | Path = "animal_welfare",
    n: int | None = None,
    seed: int | None = None,
    columns: Mapping[str, str] | None = None,
    require_answers: bool = True,
) -> list[Question]:
    """Load a question set in file order; `n` keeps the first n, or with `seed` a reproducible random n
    (returned in file order). `columns` maps our field names to the file's (e.g. {"question": "prompt"}).

    A row without `id` gets `<file stem>-<row number>`. Errors name the file and 1-based line."""
    if columns is not None:
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise ValueError(f"columns has unknown fields {sorted(unknown)}; our fields are {', '.join(FIELDS)}")
    mapping = {field: field for field in FIELDS} | dict(columns or {})
    text, source, suffix = _read(path_or_name)
    rows = _jsonl_rows(text, source) if suffix == ".jsonl" else _csv_rows(text, source)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(rows, start=1):
        question = _question(row, mapping, require_answers, f"{source}:{line}", f"{Path(source).stem}-{index:04d}")
        if question.id in seen:
            raise ValueError(
                f"{source}:{line}: duplicate id {question.id!r} (first on line {seen[question.id]}); ids must be unique"
            )
        seen[question.id] = line
        questions.append(question)
    if not questions:
        raise ValueError(f"{source}: no questions in the file; it must hold at least one row")
    return _subset(questions, n, seed, source)


def _subset(questions: list[Question], n: int | None, seed: int | None, source: str) -> list[Question]:
    if n is None:
        return questions
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(questions):
        raise ValueError(f"n={n!r} is out of range; {source} has {len(questions)} questions, pick 1..{len(questions)}")
    if seed is None:
        return questions[:n]
    keep = sorted(random.Random(seed).sample(range(len(questions)), n))
    return [questions[i] for i in keep]


def _data_dir() -> Any:
    return resources.files(__package__ or "steering").joinpath("data").joinpath("questions")


def _read(path_or_name: str | Path) -> tuple[str, str, str]:
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or text.endswith(_EXTENSIONS) or "/" in text or "\\" in text:
        path = Path(path_or_name)
        if path.suffix.lower() not in _EXTENSIONS:
            raise ValueError(f"{path}: unsupported file type; use one of {', '.join(_EXTENSIONS)}")
        if not path.is_file():
            raise ValueError(f"question file {str(path)!r} does not exist; pass an existing .jsonl or .csv path")
        return path.read_text(encoding="utf-8-sig"), str(path), path.suffix.lower()
    key = text.replace("-", "_")
    resource = _data_dir().joinpath(f"{key}.jsonl")
    if not resource.is_file():
        raise ValueError(
            f"unknown question set {text!r}; valid sets: {', '.join(available_question_sets()) or '(none)'} "
            "(or pass the path of a .jsonl or .csv file)"
        )
    return resource.read_text(encoding="utf-8"), f"{key}.jsonl", ".jsonl"


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{source}:{line_no}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def _csv_rows(text: str, source: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    previous = 0
    for cells in reader:
        start, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            continue
        if len(cells) != len(header):
            raise ValueError(
                f"{source}:{start}: {len(cells)} cells but the header has {len(header)} columns; "
                "quote cells that contain commas"
            )
        yield start, dict(zip(header, cells, strict=True))


def _question(
    row: Mapping[str, Any], mapping: Mapping[str, str], require_answers: bool, where: str, default_id: str
) -> Question:
    values: dict[str, str | None] = {}
    for field in FIELDS:
        column = mapping[field]
        value = row.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "id":
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
        values[field] = value.strip() if isinstance(value, str) and value.strip() else None
    required = ("question", *_ANSWERS) if require_answers else ("question",)
    missing = [mapping[f] for f in required if values[f] is None]
    if missing:
        hint = " (or load with require_answers=False)" if set(missing) & {mapping[a] for a in _ANSWERS} else ""
        raise ValueError(
            f"{where}: missing or empty field(s) {', '.join(map(repr, missing))}; add them or map other "
            f"columns with columns={{...}}{hint}"
        )
    return Question(
        id=values["id"] or default_id,
        question=values["question"] or "",
        compliant=values["compliant"],
        refusing=values["refusing"],
        topic=values["topic"] or "",
    )


def as_dicts(questions: Sequence[Question]) -> list[dict[str, Any]]:
    """Plain dicts (for JSON, pandas, or the store)."""
    return [{field: getattr(q, field) for field in FIELDS} for q in questions]
