"""Contrast-pair datasets: the three driver datasets shipped with the package, plus loaders for outside formats.

Driver files (``vectors/data/{driver}.jsonl``) hold one record per line with ``id``, ``split`` (train / test),
``question``, ``answer_matching_behavior`` and ``answer_not_matching_behavior`` (``"(A)"`` / ``"(B)"``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from .pairs import SPLITS, ContrastPair, caa_pair, select_split

DRIVERS = ("values", "goal_guarding", "sycophancy")
DATA_DIR = Path(__file__).resolve().parent / "data"

_DRIVER_KEYS = ("id", "split", "question", "answer_matching_behavior", "answer_not_matching_behavior")
_CAA_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
_COLUMNS = ("prompt", "positive", "negative")


def driver_path(name: str) -> Path:
    """The packaged JSONL file of driver ``name`` (one of ``DRIVERS``)."""
    if name not in DRIVERS:
        raise ValueError(
            f"unknown driver {name!r}; use one of {', '.join(DRIVERS)} or load a file with load_pairs(path)"
        )
    path = DATA_DIR / f"{name}.jsonl"
    if not path.exists():
        raise ValueError(f"the dataset of driver {name!r} is missing ({path}); reinstall the package")
    return path


def _resolve(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, str) and name_or_path in DRIVERS:
        return driver_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"{name_or_path!s} is neither a driver ({', '.join(DRIVERS)}) nor an existing file")
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in chunks): pins the exact content of a vector or data file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"cannot hash {path}: it is not an existing file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_sha256(name_or_path: str | Path) -> str:
    """SHA-256 hex digest of a driver's dataset file (or of any file): pins the exact data a vector came from."""
    return file_sha256(_resolve(name_or_path))


def _nonempty(pairs: list[ContrastPair], path: Path, split: str = "all") -> list[ContrastPair]:
    if not pairs:
        where = "" if split == "all" else f" in split {split!r}"
        raise ValueError(f"{path}: no contrast pairs{where}; check the file (and the split)")
    return pairs


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _require(record: Mapping, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; each record needs {', '.join(keys)}")


def load_driver(name: str, split: str = "train") -> list[ContrastPair]:
    """Contrast pairs of a driver (``values``, ``goal_guarding``, ``sycophancy``) or of a file in the same format.

    ``split``: "train", "test" (the fixed held-out split) or "all".
    """
    path = _resolve(name)
    pairs, seen = [], set()
    for number, record in _jsonl_records(path):
        where = f"{path}:{number}"
        _require(record, _DRIVER_KEYS, where)
        if record["split"] not in SPLITS:
            raise ValueError(f"{where}: split must be 'train' or 'test', got {record['split']!r}")
        if record["id"] in seen:
            raise ValueError(f"{where}: duplicate id {record['id']!r}; ids must be unique")
        seen.add(record["id"])
        try:
            pair = caa_pair(
                record["question"],
                record["answer_matching_behavior"],
                record["answer_not_matching_behavior"],
                id=str(record["id"]),
                split=record["split"],
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        pairs.append(pair)
    _nonempty(pairs, path)
    return _nonempty(select_split(pairs, split), path, split)


def load_caa_json(path: str | Path) -> list[ContrastPair]:
    """CAA A/B data: a JSON list of objects with ``question``, ``answer_matching_behavior``,
    ``answer_not_matching_behavior`` (answers like ``"(A)"``)."""
    path = _resolve(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of question objects, got {type(records).__name__}")
    pairs = []
    for number, record in enumerate(records, start=1):
        where = f"{path}: item {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        _require(record, _CAA_KEYS, where)
        pairs += _caa_pairs(record, str(record.get("id", number)), record.get("split"), where)
    return _nonempty(pairs, path)


def _caa_pairs(record: Mapping, id: str, split: str | None, where: str) -> list[ContrastPair]:
    """One pair per non-matching answer (model-written-evals files sometimes list several)."""
    negatives = record["answer_not_matching_behavior"]
    negatives = negatives if isinstance(negatives, list) else [negatives]
    if not negatives:
        raise ValueError(f"{where}: answer_not_matching_behavior is empty; give at least one answer")
    out = []
    for k, negative in enumerate(negatives):
        pair_id = id if len(negatives) == 1 else f"{id}-{k}"
        try:
            out.append(caa_pair(record["question"], record["answer_matching_behavior"], negative, pair_id, split))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out


def load_mwe_jsonl(path: str | Path) -> list[ContrastPair]:
    """Anthropic model-written-evals JSONL: one object per line with ``question``, ``answer_matching_behavior``,
    ``answer_not_matching_behavior`` (answers like ``" (A)"``; a list of non-matching answers gives one pair each)."""
    path = _resolve(path)
    pairs = []
    for number, record in _jsonl_records(path):
        where = f"{path}:{number}"
        _require(record, _CAA_KEYS, where)
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: split must be 'train' or 'test', got {split!r}")
        pairs += _caa_pairs(record, str(record.get("id", number)), split, where)
    return _nonempty(pairs, path)


def _mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    columns = dict(columns or {})
    unknown = set(columns) - {*_COLUMNS, "id", "split"}
    if unknown:
        raise ValueError(
            f"unknown column role(s) {', '.join(sorted(unknown))}; map 'prompt', 'positive', 'negative' "
            "(and optionally 'id', 'split') to your column names"
        )
    return {role: columns.get(role, role) for role in (*_COLUMNS, "id", "split")}


def _generic_pair(row: Mapping, cols: dict[str, str], where: str, default_id: str) -> ContrastPair:
    missing = [cols[r] for r in _COLUMNS if cols[r] not in row]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(missing)}; pass columns={{'prompt': ..., 'positive': ..., "
            "'negative': ...}} naming your columns"
        )
    split = row.get(cols["split"]) or None
    ident = row.get(cols["id"])
    try:
        return ContrastPair(
            row[cols["prompt"]],
            row[cols["positive"]],
            row[cols["negative"]],
            id=default_id if ident in (None, "") else str(ident),
            split=split,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def load_jsonl(path: str | Path, columns: Mapping[str, str] | None = None) -> list[ContrastPair]:
    """Generic JSONL: ``columns`` maps ``prompt`` / ``positive`` / ``negative`` (optionally ``id`` / ``split``) to
    keys; completions are used verbatim."""
    path, cols = _resolve(path), _mapping(columns)
    pairs = [_generic_pair(rec, cols, f"{path}:{n}", str(n)) for n, rec in _jsonl_records(path)]
    return _nonempty(pairs, path)


def load_csv(path: str | Path, columns: Mapping[str, str] | None = None) -> list[ContrastPair]:
    """Generic CSV with a header row: ``columns`` maps ``prompt`` / ``positive`` / ``negative`` (optionally ``id`` /
    ``split``) to column names; completions are used verbatim."""
    path, cols = _resolve(path), _mapping(columns)
    pairs = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            pairs.append(_generic_pair(row, cols, f"{path}:{reader.line_num}", str(reader.line_num)))
    return _nonempty(pairs, path)


def load_pairs(source: str | Path, split: str = "all", columns: Mapping[str, str] | None = None) -> list[ContrastPair]:
    """Load any supported source: a driver name, a driver-format / model-written-evals / generic JSONL, a CAA
    JSON list, or a CSV (``columns`` selects the generic loaders). ``split`` filters labelled data."""
    if isinstance(source, str) and source in DRIVERS:
        return load_driver(source, split)
    path = _resolve(source)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        pairs = load_csv(path, columns)
    elif suffix == ".json":
        pairs = load_caa_json(path)
    elif suffix == ".jsonl":
        if columns is not None:
            pairs = load_jsonl(path, columns)
        else:
            first = next((rec for _, rec in _jsonl_records(path)), {})
            if all(k in first for k in _DRIVER_KEYS):
                pairs = load_driver(path, "all")
            elif all(k in first for k in _CAA_KEYS):
                pairs = load_mwe_jsonl(path)
            else:
                pairs = load_jsonl(path)
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json (CAA list) or .csv")
    return _nonempty(select_split(pairs, split), path, split)
