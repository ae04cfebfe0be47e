"""Tests for steering.store: keys, resume, refusal to mix runs, atomic batches, errors, kill -9 safety."""

from __future__ import annotations

import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from steering.store import (
    FORMAT_VERSION,
    KEY_COLUMNS,
    ResultStore,
    StoreError,
    StoreMismatchError,
    spec_hash,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SPEC = {"drivers": ["values"], "layers": [3], "coefficients": [0.0, 2.0]}


def row(**overrides):
    base = {
        "run": "r1",
        "model": "m",
        "driver": "values",
        "layer": 3,
        "coefficient": 2.0,
        "variant": "base",
        "condition": "monitored",
        "question": "q1",
        "seed": 0,
        "scorer": "fc",
        "compliance": 0.75,
        "extra": "{}",
    }
    base.update(overrides)
    return base


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "results.db") as s:
        s.begin_run("r1", SPEC, "m", {"steering": "0.1"})
        yield s


def test_pragmas_and_schema(store):
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
    runs = store.runs()
    assert list(runs["run"]) == ["r1"]
    assert runs.loc[0, "spec_hash"] == spec_hash(SPEC)
    assert runs.loc[0, "format_version"] == FORMAT_VERSION


def test_spec_hash_is_canonical():
    assert spec_hash({"a": 1, "b": [1, 2]}) == spec_hash({"b": [1, 2], "a": 1})
    assert spec_hash({"a": 1}) != spec_hash({"a": 2})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        spec_hash({"a": object()})


def test_write_and_read_back_types(store):
    store.write_rows([row(), row(condition="unmonitored", compliance=None, extra={"note": "x"})])
    df = store.frame()
    assert len(df) == 2
    assert df["layer"].dtype == "int64" and df["seed"].dtype == "int64"
    mon = df[df.condition == "monitored"].iloc[0]
    unm = df[df.condition == "unmonitored"].iloc[0]
    assert mon["compliance"] == 0.75
    assert pd.isna(unm["compliance"])
    assert unm["extra"] == '{"note":"x"}'


def test_done_keys_in_column_order(store):
    store.write_rows([row(), row(question="q2", compliance=None)])
    keys = store.done_keys("r1")
    assert ("r1", "m", "values", 3, 2.0, "base", "monitored", "q1", 0, "fc") in keys
    assert len(keys) == 2
    assert store.done_keys("r1", judged_only=True) == {
        ("r1", "m", "values", 3, 2.0, "base", "monitored", "q1", 0, "fc")
    }
    assert store.done_keys("other") == set()


def test_rewrite_replaces_never_duplicates(store):
    store.write_rows([row(compliance=0.1)])
    store.write_rows([row(compliance=0.9), row(coefficient=-0.0, compliance=0.5)])
    store.write_rows([row(coefficient=0.0, compliance=0.4)])  # -0.0 and 0.0 are one key
    df = store.frame()
    assert len(df) == 2
    assert df.set_index("coefficient").loc[2.0, "compliance"] == 0.9
    assert df.set_index("coefficient").loc[0.0, "compliance"] == 0.4


def test_numpy_values_accepted(store):
    import numpy as np

    store.write_rows(
        [row(layer=np.int64(5), seed=np.int32(2), coefficient=np.float32(1.5), compliance=np.float64(0.25))]
    )
    assert store.done_keys("r1") == {("r1", "m", "values", 5, 1.5, "base", "monitored", "q1", 2, "fc")}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"condition": "watched"}, "condition must be one of"),
        ({"compliance": 1.5}, r"\[0, 1\]"),
        ({"layer": 2.5}, "integer"),
        ({"coefficient": float("inf")}, "finite"),
        ({"extra": "{not json"}, "invalid JSON"),
    ],
)
def test_bad_rows_rejected_whole_batch(store, bad, match):
    with pytest.raises(ValueError, match=match):
        store.write_rows([row(question="ok"), row(**bad)])
    assert len(store) == 0


def test_missing_key_column_rejected(store):
    r = row()
    del r["seed"]
    with pytest.raises(ValueError, match="seed"):
        store.write_rows([r])


def test_unregistered_run_rejected(store):
    with pytest.raises(ValueError, match="begin_run"):
        store.write_rows([row(), row(run="nope")])
    assert len(store) == 0


def test_begin_run_resume_and_mismatch(tmp_path):
    path = tmp_path / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", {"steering": "0.1"})
        s.write_rows([row()])
    with ResultStore(path) as s:
        s.begin_run("r1", dict(reversed(list(SPEC.items()))), "m", {"steering": "0.2"})  # same spec: resume
        assert len(s.done_keys("r1")) == 1
        with pytest.raises(StoreMismatchError, match="new run name or a new store"):
            s.begin_run("r1", {**SPEC, "layers": [4]}, "m", {})
        with pytest.raises(StoreMismatchError, match="model"):
            s.begin_run("r1", SPEC, "other-model", {})
        s.begin_run("r2", {**SPEC, "layers": [4]}, "m", {})
        assert list(s.runs()["run"]) == ["r1", "r2"]


def test_format_version_mismatch(tmp_path):
    path = tmp_path / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", {})
        s._conn.execute("UPDATE runs SET format_version = 0")
        with pytest.raises(StoreMismatchError, match="format version"):
            s.begin_run("r1", SPEC, "m", {})
        s._conn.execute(f"PRAGMA user_version={FORMAT_VERSION + 1}")
    with pytest.raises(StoreMismatchError, match="new store"):
        ResultStore(path)


def test_missing_directory_is_clear(tmp_path):
    target = tmp_path / "nope" / "s.db"
    with pytest.raises(StoreError, match="does not exist") as info:
        ResultStore(target)
    assert str(target) in str(info.value)
    assert not target.parent.exists()


def test_parent_is_a_file_or_path_is_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        ResultStore(tmp_path / "file" / "s.db")
    with pytest.raises(StoreError, match="is a directory"):
        ResultStore(tmp_path)


def test_not_a_database_is_clear(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(junk)):
        ResultStore(junk)


def test_readonly_directory_is_clear(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root ignores permission bits: emulate what os.access reports for a read-only directory
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    try:
        with pytest.raises(StoreError, match="not writable") as info:
            ResultStore(ro / "s.db")
        assert str(ro / "s.db") in str(info.value)
    finally:
        ro.chmod(0o755)


def test_readonly_open_reads_and_refuses_writes(tmp_path):
    path = tmp_path / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", {})
        s.write_rows([row()])
    with ResultStore(path, readonly=True) as ro:
        assert len(ro.frame()) == 1
        with pytest.raises(StoreError, match="read-only"):
            ro.write_rows([row(question="q9")])
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "absent.db", readonly=True)


def test_disk_full_rolls_back_and_names_path(store):
    store.write_rows([row(question="keep")])
    (pages,) = store._conn.execute("PRAGMA page_count").fetchone()
    store._conn.execute(f"PRAGMA max_page_count={pages + 2}")  # emulate a nearly full disk
    big = [row(question=f"q{i:05d}", extra={"pad": "x" * 500}) for i in range(400)]
    with pytest.raises(StoreError, match="full") as info:
        store.write_rows(big)
    assert str(store.path) in str(info.value)
    assert "nothing was written" in str(info.value)
    assert not store._conn.in_transaction
    assert list(store.frame()["question"]) == ["keep"]
    store._conn.execute("PRAGMA max_page_count=1073741823")
    assert store.write_rows(big[:3]) == 3  # usable again once space is back


def test_export_parquet_and_csv(store, tmp_path):
    store.write_rows([row(), row(condition="unmonitored", compliance=None)])
    pq = store.export(tmp_path / "out.parquet")
    csv = store.export(tmp_path / "out.csv")
    a, b = pd.read_parquet(pq), pd.read_csv(csv)
    assert len(a) == len(b) == 2
    assert list(a.columns) == list(KEY_COLUMNS) + ["compliance", "extra"]
    assert a["compliance"].isna().sum() == 1 and b["compliance"].isna().sum() == 1
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        store.export(tmp_path / "out.xlsx")


def test_close_is_idempotent_and_final(tmp_path):
    s = ResultStore(tmp_path / "s.db")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.frame()


def _writer(path: Path, n_batches: int, batch_size: int, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(TESTS / "store_writer.py"),
        str(path),
        str(n_batches),
        str(batch_size),
        str(sleep),
    ]
    return subprocess.Popen(cmd, env=env)


def _load_writer():
    spec = importlib.util.spec_from_file_location("store_writer", TESTS / "store_writer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        conn.close()


def test_kill_dash_nine_then_resume_matches_uninterrupted(tmp_path):
    n_batches, batch_size = 40, 30
    total = n_batches * batch_size
    killed_path, clean_path = tmp_path / "killed.db", tmp_path / "clean.db"

    victim = _writer(killed_path, n_batches, batch_size, 0.05)
    deadline = time.monotonic() + 12
    while _count(killed_path) < 3 * batch_size and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    at_kill = _count(killed_path)
    assert 0 < at_kill < total, "writer must be killed part-way; raise n_batches or the sleep if this fails"
    assert at_kill % batch_size == 0, "a batch was partly written"

    # resume and the uninterrupted reference run in-process: same code, without two more interpreter start-ups
    writer = _load_writer()
    writer.main([str(killed_path), str(n_batches), str(batch_size), "0"])
    writer.main([str(clean_path), str(n_batches), str(batch_size), "0"])

    with ResultStore(killed_path) as a, ResultStore(clean_path) as b:
        fa, fb = a.frame(), b.frame()
        assert len(a.runs()) == 1
    assert len(fa) == len(fb) == total
    assert not fa.duplicated(list(KEY_COLUMNS)).any()
    key = list(KEY_COLUMNS)
    pd.testing.assert_frame_equal(
        fa.sort_values(key).reset_index(drop=True), fb.sort_values(key).reset_index(drop=True)
    )
