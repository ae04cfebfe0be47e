"""Question loaders: file order, reproducible subsets, outside formats, errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steering.questions import Question, as_dicts, available_question_sets, load_questions


def _row(i: int, **extra) -> dict:
    row = {
        "id": f"q-{i:03d}",
        "topic": "feed",
        "question": f"Question {i}?",
        "compliant": f"C{i}",
        "refusing": f"R{i}",
    }
    row.update(extra)
    return row


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(_row(i)) for i in range(1, 21)) + "\n", encoding="utf-8")
    return path


def test_loads_in_file_order_with_all_fields(jsonl: Path):
    questions = load_questions(jsonl)
    assert [q.id for q in questions] == [f"q-{i:03d}" for i in range(1, 21)]
    assert questions[4] == Question("q-005", "Question 5?", "C5", "R5", "feed")
    assert as_dicts(questions[:1]) == [_row(1)]


def test_subset_is_reproducible_and_in_file_order(jsonl: Path):
    a = load_questions(jsonl, n=7, seed=3)
    b = load_questions(str(jsonl), n=7, seed=3)
    c = load_questions(jsonl, n=7, seed=4)
    assert a == b and len(a) == 7
    assert [q.id for q in a] != [q.id for q in c]
    order = [q.id for q in load_questions(jsonl)]
    assert [order.index(q.id) for q in a] == sorted(order.index(q.id) for q in a)
    assert [q.id for q in load_questions(jsonl, n=3)] == ["q-001", "q-002", "q-003"]
    with pytest.raises(ValueError, match=r"n=21 is out of range; .* has 20 questions"):
        load_questions(jsonl, n=21, seed=0)


def test_missing_field_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    rows = [json.dumps(_row(1)), "", json.dumps({k: v for k, v in _row(3).items() if k != "refusing"})]
    path.write_text("\n".join(rows), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:3: missing or empty field\(s\) 'refusing'.*require_answers=False"
    ):
        load_questions(path)
    assert [q.refusing for q in load_questions(path, require_answers=False)] == ["R1", None]


def test_bad_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n" + json.dumps(_row(2)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: invalid JSON"):
        load_questions(path)
    path.write_text(json.dumps(_row(1)) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: expected a JSON object"):
        load_questions(path)


def test_wrong_type_and_duplicate_ids(tmp_path: Path):
    path = tmp_path / "types.jsonl"
    path.write_text(json.dumps(_row(1, question=["a"])) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"types\.jsonl:1: field 'question' must be a string"):
        load_questions(path)
    path.write_text(json.dumps(_row(1)) + "\n" + json.dumps(_row(1)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"types\.jsonl:2: duplicate id 'q-001' \(first on line 1\)"):
        load_questions(path)


def test_empty_file_is_a_clear_error(tmp_path: Path):
    for name in ("empty.jsonl", "empty.csv"):
        path = tmp_path / name
        path.write_text("\n\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"{name}: no questions"):
            load_questions(path)


def test_csv_with_column_mapping_and_generated_ids(tmp_path: Path):
    path = tmp_path / "outside.csv"
    path.write_text(
        'prompt,good,bad\n"Is feed, really, costly?",Yes,"No,\nnot at all"\n\nWhy eggs?,Cheap,Cruel\n',
        encoding="utf-8",
    )
    questions = load_questions(path, columns={"question": "prompt", "compliant": "good", "refusing": "bad"})
    assert [q.id for q in questions] == ["outside-0001", "outside-0002"]
    assert questions[0].question == "Is feed, really, costly?"
    assert questions[0].refusing == "No,\nnot at all"
    assert questions[1] == Question("outside-0002", "Why eggs?", "Cheap", "Cruel", "")
    with pytest.raises(ValueError, match=r"outside\.csv:2: missing or empty field\(s\) 'question'"):
        load_questions(path)
    path.write_text("prompt,good\nA,B\nC,D,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"outside\.csv:3: 3 cells but the header has 2 columns"):
        load_questions(path, columns={"question": "prompt"}, require_answers=False)


def test_requests_only_set(tmp_path: Path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "Write a poem."}\n{"prompt": "Summarise this."}\n', encoding="utf-8")
    questions = load_questions(path, columns={"question": "prompt"}, require_answers=False)
    assert [(q.id, q.question, q.compliant) for q in questions] == [
        ("requests-0001", "Write a poem.", None),
        ("requests-0002", "Summarise this.", None),
    ]


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown fields \['prompt'\]"):
        load_questions("animal_welfare", columns={"prompt": "question"})
    with pytest.raises(ValueError, match=r"unknown question set 'no_such_set'"):
        load_questions("no_such_set")
    with pytest.raises(ValueError, match=r"unsupported file type"):
        load_questions(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"does not exist"):
        load_questions(tmp_path / "missing.jsonl")


def test_packaged_animal_welfare_set():
    if "animal_welfare" not in available_question_sets():
        pytest.skip("packaged question file not written yet")
    questions = load_questions()
    assert len(questions) >= 150
    assert all(q.id.startswith("aw-") and q.compliant and q.refusing and q.topic for q in questions)
    assert len({q.question for q in questions}) == len(questions)
    subset = load_questions(n=100, seed=0)
    assert len(subset) == 100 and subset == load_questions("animal-welfare", n=100, seed=0)
