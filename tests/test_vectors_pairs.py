"""Contrast pairs and dataset loaders: packaged drivers, CAA JSON, model-written-evals JSONL, generic JSONL / CSV."""

from __future__ import annotations

import hashlib
import json

import pytest

from steering.vectors import (
    DRIVERS,
    ContrastPair,
    answer_completion,
    dataset_sha256,
    driver_path,
    load_caa_json,
    load_csv,
    load_driver,
    load_jsonl,
    load_mwe_jsonl,
    load_pairs,
    pairs_sha256,
    select_split,
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _record(i: int, split: str = "train", matching: str = "(A)", not_matching: str = "(B)") -> dict:
    return {
        "id": f"x-{i}",
        "split": split,
        "question": f"Situation {i}.\n\nChoices:\n(A) one\n(B) two",
        "answer_matching_behavior": matching,
        "answer_not_matching_behavior": not_matching,
    }


@pytest.mark.parametrize(
    "answer, expected", [("(A)", "(A"), (" (B)", "(B"), ("(C", "(C"), (" Yes", "Yes"), ("(A) agree", "(A) agree")]
)
def test_answer_completion_keeps_the_letter_last(answer, expected):
    assert answer_completion(answer) == expected


def test_contrast_pair_rejects_bad_fields():
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        ContrastPair("", "(A", "(B")
    with pytest.raises(ValueError, match="must differ"):
        ContrastPair("q", "(A", "(A")
    with pytest.raises(ValueError, match="split must be one of"):
        ContrastPair("q", "(A", "(B", split="dev")


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_datasets_have_a_fixed_split_and_letter_completions(driver):
    train, test, everything = load_driver(driver, "train"), load_driver(driver, "test"), load_driver(driver, "all")
    assert len(everything) >= 230
    assert len(train) + len(test) == len(everything)
    assert 0.15 <= len(test) / len(everything) <= 0.25
    assert {p.id for p in train}.isdisjoint({p.id for p in test})
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)
    for pair in everything:
        assert pair.positive in ("(A", "(B") and pair.negative in ("(A", "(B")
        assert "(A)" in pair.prompt and "(B)" in pair.prompt
    # both letters carry the matching behaviour, so the vector cannot be "the letter A"
    share_a = sum(p.positive == "(A" for p in train) / len(train)
    assert 0.35 <= share_a <= 0.65


def test_dataset_sha256_is_the_file_hash():
    path = driver_path("values")
    assert dataset_sha256("values") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset_sha256(path) == dataset_sha256("values")
    assert dataset_sha256("values") != dataset_sha256("sycophancy")


def test_unknown_driver_names_the_choices():
    with pytest.raises(ValueError, match="neither a driver"):
        load_driver("honesty")


def test_driver_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_driver(path)
    record = _record(2)
    del record["answer_not_matching_behavior"]
    _write_jsonl(path, [_record(1), record])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing key\(s\) answer_not_matching_behavior"):
        load_driver(path)
    _write_jsonl(path, [_record(1), _record(2, split="valid")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: split must be"):
        load_driver(path)
    _write_jsonl(path, [_record(1), _record(1)])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: duplicate id"):
        load_driver(path)
    _write_jsonl(path, [_record(1), _record(2, not_matching="(A)")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*must differ"):
        load_driver(path)


def test_empty_dataset_and_empty_split_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no contrast pairs"):
        load_driver(empty, "all")
    only_train = _write_jsonl(tmp_path / "train_only.jsonl", [_record(1), _record(2)])
    with pytest.raises(ValueError, match="no contrast pairs in split 'test'"):
        load_driver(only_train, "test")
    assert [p.id for p in load_driver(only_train, "train")] == ["x-1", "x-2"]


def test_caa_json_loader(tmp_path):
    path = tmp_path / "caa.json"
    items = [
        {"question": "Q1\n(A) a\n(B) b", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"},
        {"question": "Q2\n(A) a\n(B) b", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"},
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    pairs = load_caa_json(path)
    assert [(p.prompt, p.positive, p.negative, p.id) for p in pairs] == [
        ("Q1\n(A) a\n(B) b", "(B", "(A", "1"),
        ("Q2\n(A) a\n(B) b", "(A", "(B", "2"),
    ]
    assert load_pairs(path) == pairs
    path.write_text(json.dumps([items[0], {"question": "Q3"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"caa\.json: item 2: missing key"):
        load_caa_json(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no contrast pairs"):
        load_caa_json(path)


def test_model_written_evals_loader(tmp_path):
    records = [
        {"question": "Q1\n (A) x\n (B) y", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"},
        {"question": "Q2", "answer_matching_behavior": " (C)", "answer_not_matching_behavior": [" (A)", " (B)"]},
        {"question": "Q3", "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"},
    ]
    path = _write_jsonl(tmp_path / "mwe.jsonl", records)
    pairs = load_mwe_jsonl(path)
    assert [(p.positive, p.negative, p.id) for p in pairs] == [
        ("(A", "(B", "1"),
        ("(C", "(A", "2-0"),
        ("(C", "(B", "2-1"),
        ("Yes", "No", "3"),
    ]
    assert load_pairs(path) == pairs  # detected by its keys
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('["a list"]\n')
    with pytest.raises(ValueError, match=r"mwe\.jsonl:4: expected a JSON object"):
        load_mwe_jsonl(path)


def test_generic_jsonl_and_csv_with_a_column_mapping(tmp_path):
    columns = {"prompt": "text", "positive": "good", "negative": "bad", "split": "part"}
    rows = [
        {"text": "Say hi", "good": " Hello!", "bad": " Go away.", "part": "train"},
        {"text": "Say bye", "good": " Bye!", "bad": " Whatever.", "part": "test"},
    ]
    jsonl = _write_jsonl(tmp_path / "g.jsonl", rows)
    pairs = load_jsonl(jsonl, columns)
    assert [(p.prompt, p.positive, p.negative, p.split) for p in pairs] == [
        ("Say hi", " Hello!", " Go away.", "train"),
        ("Say bye", " Bye!", " Whatever.", "test"),
    ]
    assert [p.prompt for p in load_pairs(jsonl, "test", columns)] == ["Say bye"]
    csv_path = tmp_path / "g.csv"
    csv_path.write_text('text,good,bad,part\nSay hi, Hello!, Go away.,train\n"Say\nbye", Bye!, Whatever.,test\n')
    assert [(p.prompt, p.positive, p.split) for p in load_csv(csv_path, columns)] == [
        ("Say hi", " Hello!", "train"),
        ("Say\nbye", " Bye!", "test"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,good,bad\nfine,a,b\nfine,,b\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: .*positive must be a non-empty string"):
        load_csv(bad, {"prompt": "text", "positive": "good", "negative": "bad"})
    with pytest.raises(ValueError, match=r"bad\.csv:2: missing column\(s\) prompt"):
        load_csv(bad)
    with pytest.raises(ValueError, match="unknown column role"):
        load_csv(bad, {"question": "text"})


def test_select_split_and_pairs_hash():
    pairs = [ContrastPair("a", "(A", "(B", split="train"), ContrastPair("b", "(B", "(A", split="test")]
    assert select_split(pairs, "test") == pairs[1:]
    with pytest.raises(ValueError, match="no split labels"):
        select_split([ContrastPair("a", "(A", "(B")], "train")
    assert pairs_sha256(pairs) == pairs_sha256(list(pairs))
    assert pairs_sha256(pairs) != pairs_sha256(pairs[::-1])


def test_pairs_know_their_answer_letters_and_balance_group():
    from dataclasses import asdict

    from steering.vectors import caa_pair

    a, b = caa_pair("q", "(A)", " (B)"), caa_pair("q", " (B)", "(A)")
    assert (a.positive_letter, a.negative_letter, a.balance_group) == ("A", "B", "A")
    assert (b.positive_letter, b.negative_letter, b.balance_group) == ("B", "A", "B")
    plain = ContrastPair("q", " Yes", " No")
    assert (plain.positive_letter, plain.group, plain.balance_group) == (None, None, None)
    assert ContrastPair("q", " Yes", " No", group="yes-first").balance_group == "yes-first"
    assert ContrastPair("q", "(A", "(B", group="g").balance_group == "g"  # an explicit group wins
    with pytest.raises(ValueError, match="group must be a non-empty string"):
        ContrastPair("q", "(A", "(B", group="")
    # the packaged data: every pair has a letter group, both letters occur in each split
    train = load_driver("values", "train")
    assert {p.balance_group for p in train} == {"A", "B"}
    # pairs without a group hash exactly as before the field existed
    old = hashlib.sha256()
    for pair in train[:3]:
        record = {k: v for k, v in asdict(pair).items() if k != "group"}
        old.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    assert pairs_sha256(train[:3]) == old.hexdigest()
    assert pairs_sha256([ContrastPair("q", "(A", "(B", group="g")]) != pairs_sha256([ContrastPair("q", "(A", "(B")])
