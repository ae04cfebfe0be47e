"""Tests for steering.store: keys, resume, refusal to mix runs, atomic batches, errors, kill -9 safety."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
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
    keys = store.done_keys("r1", judged_only=False)
    assert ("r1", "m", "values", 3, 2.0, "base", "monitored", "q1", 0, "fc") in keys
    assert len(keys) == 2
    assert store.done_keys("r1", judged_only=True) == {
        ("r1", "m", "values", 3, 2.0, "base", "monitored", "q1", 0, "fc")
    }
    assert store.done_keys("other") == set()


def test_unjudged_rows_are_not_done_and_are_counted(store):
    store.begin_run("r2", SPEC, "m")
    store.write_rows([row(), row(question="q2", compliance=None), row(question="q3", compliance=float("nan"))])
    store.write_rows([row(run="r2", compliance=None)])
    assert store.done_keys("r1") == {("r1", "m", "values", 3, 2.0, "base", "monitored", "q1", 0, "fc")}
    assert store.unjudged_count("r1") == 2 and store.unjudged_count("r2") == 1 and store.unjudged_count() == 3
    store.write_rows([row(question="q2", compliance=0.5)])  # the rerun judges it: now done
    assert len(store.done_keys("r1")) == 2 and store.unjudged_count("r1") == 1


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
        s.write_rows([row()])  # a run without rows would be re-registered instead
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


# -- a refused spec leaves no trace -------------------------------------------------------------------------


def test_run_without_rows_is_re_registered_with_the_new_setup(tmp_path, caplog):
    path = tmp_path / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", {**SPEC, "layers": [99]}, "m")  # the typo: refused later, before any row
    with ResultStore(path) as s, caplog.at_level("WARNING", logger="steering.store"):
        s.begin_run("r1", SPEC, "other-model")  # the fixed spec: accepted, not "already exists"
        runs = s.runs()
        assert list(runs["run"]) == ["r1"] and runs.loc[0, "spec_hash"] == spec_hash(SPEC)
        assert runs.loc[0, "model"] == "other-model"
        assert "has no rows; replacing its registration" in caplog.text
        s.write_rows([row(model="other-model")])
        with pytest.raises(StoreMismatchError, match="already exists"):
            s.begin_run("r1", {**SPEC, "layers": [5]}, "other-model")  # now it has a row: refuse to mix
        assert s.runs().loc[0, "spec_hash"] == spec_hash(SPEC)


# -- input hashes --------------------------------------------------------------------------------------------


def test_inputs_are_recorded_and_a_changed_file_is_named(tmp_path):
    from steering.vectors import dataset_sha256, file_sha256

    vector = tmp_path / "values.safetensors"
    vector.write_bytes(b"vector bytes v1")
    inputs = {"vector:values": file_sha256(vector), "dataset:goal_guarding": dataset_sha256("goal_guarding")}
    assert inputs["vector:values"] == hashlib.sha256(b"vector bytes v1").hexdigest()
    path = tmp_path / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", inputs=inputs)
        s.write_rows([row()])
        assert s.run_inputs("r1") == inputs
    vector.write_bytes(b"vector bytes v2")  # the file changed between the killed run and its resume
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", inputs=dict(inputs))  # unchanged: resume
        with pytest.raises(StoreMismatchError) as info:
            s.begin_run("r1", SPEC, "m", inputs={**inputs, "vector:values": file_sha256(vector)})
        message = str(info.value)
        assert "'vector:values' changed" in message and "'dataset:goal_guarding'" not in message
        assert "new run name" in message and "delete the store" in message
        with pytest.raises(StoreMismatchError, match="'dataset:goal_guarding' was used by the run but is not given"):
            s.begin_run("r1", SPEC, "m", inputs={"vector:values": inputs["vector:values"]})
        assert s.run_inputs("r1") == inputs  # nothing was overwritten


def test_store_without_inputs_column_is_upgraded(tmp_path):
    """A store written before inputs were recorded: opens, reads, and records inputs on the next begin_run."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE runs (run TEXT PRIMARY KEY, spec_json TEXT NOT NULL, spec_hash TEXT NOT NULL,
            format_version INTEGER NOT NULL, model TEXT NOT NULL, versions_json TEXT NOT NULL,
            created_at TEXT NOT NULL);
        CREATE TABLE results (run TEXT NOT NULL REFERENCES runs(run), model TEXT NOT NULL, driver TEXT NOT NULL,
            layer INTEGER NOT NULL, coefficient REAL NOT NULL, variant TEXT NOT NULL, condition TEXT NOT NULL,
            question TEXT NOT NULL, seed INTEGER NOT NULL, scorer TEXT NOT NULL, compliance REAL,
            extra TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (run, model, driver, layer, coefficient, variant, condition, question, seed, scorer))
            WITHOUT ROWID;
        PRAGMA user_version=1;
        """
    )
    spec_json = json.dumps(SPEC, sort_keys=True, separators=(",", ":"))
    conn.execute("INSERT INTO runs VALUES ('r1', ?, ?, 1, 'm', '{}', 'then')", (spec_json, spec_hash(SPEC)))
    conn.execute("INSERT INTO results VALUES ('r1','m','values',3,2.0,'base','monitored','q1',0,'fc',0.75,'{}')")
    conn.commit()
    conn.close()
    with ResultStore(path, readonly=True) as ro:
        assert ro.runs().loc[0, "inputs_json"] == "{}" and ro.run_inputs("r1") == {}
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m", inputs={"dataset:values": "ab" * 32})  # resume: inputs recorded now
        assert s.run_inputs("r1") == {"dataset:values": "ab" * 32}
        assert len(s.frame()) == 1
    with ResultStore(path) as s, pytest.raises(StoreMismatchError, match="'dataset:values' changed"):
        s.begin_run("r1", SPEC, "m", inputs={"dataset:values": "cd" * 32})


# -- read-only folders ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def unwritable_dir(folder: Path, monkeypatch):
    """Make `folder` really unwritable: chmod 0555 as a user; as root (which chmod does not stop), the immutable
    attribute (chattr +i). Yields True when file creation in it really fails; where neither works (no
    CAP_LINUX_IMMUTABLE), it falls back to making os.access report the folder unwritable and yields False: then
    the test proves only that the store chooses its read-only-folder path, not that SQLite needs it."""
    real = False
    if os.geteuid() != 0:
        folder.chmod(0o555)
        real = True
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        real = True
    if real:
        try:
            (folder / "probe").touch()
            real = False  # still writable after all
            (folder / "probe").unlink()
        except OSError:
            pass
    if not real:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == folder else real_access(p, m))
    try:
        yield real
    finally:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
        monkeypatch.undo()


def test_finished_store_in_a_read_only_folder_opens_for_reading(tmp_path, monkeypatch):
    folder = tmp_path / "published"
    folder.mkdir()
    path = folder / "s.db"
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m")
        s.write_rows([row(), row(question="q2", compliance=None)])
    assert not path.with_name("s.db-shm").exists()  # the last connection merged and removed WAL and -shm
    with unwritable_dir(folder, monkeypatch) as really:
        if really:  # what the plain read-only open did: SQLite cannot create the -shm file it needs
            with pytest.raises(sqlite3.OperationalError):
                conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
                try:
                    conn.execute("SELECT COUNT(*) FROM results").fetchone()
                finally:
                    conn.close()
        for store in (ResultStore(path, readonly=True), ResultStore.open_for_reading(path)):
            with store:
                assert store.immutable
                df = store.frame()
                assert list(df["question"]) == ["q1", "q2"] and df["compliance"].isna().sum() == 1
                assert list(store.runs()["run"]) == ["r1"] and store.unjudged_count("r1") == 1
        assert sorted(p.name for p in folder.iterdir()) == ["s.db"]  # created nothing


def test_read_only_folder_with_an_unmerged_log_is_refused_not_misread(tmp_path, monkeypatch):
    folder = tmp_path / "killed"
    folder.mkdir()
    path = folder / "s.db"
    writer = ResultStore(path)
    writer.begin_run("r1", SPEC, "m")
    writer.write_rows([row()])  # committed to the -wal file, not yet merged into s.db
    try:
        assert path.with_name("s.db-wal").stat().st_size > 0
        with unwritable_dir(folder, monkeypatch), pytest.raises(StoreError, match="write-ahead log s.db-wal"):
            ResultStore(path, readonly=True)
    finally:
        writer.close()
    with ResultStore(path, readonly=True) as ro:  # a writable folder: the normal read-only open
        assert not ro.immutable and len(ro.frame()) == 1


# -- one writer per run --------------------------------------------------------------------------------------

_HOLDER = """
import sys
from steering.store import ResultStore
store = ResultStore(sys.argv[1])
store.begin_run("r1", {"drivers": ["values"], "layers": [3], "coefficients": [0.0, 2.0]}, "m")
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""


def test_second_process_on_the_same_run_is_refused(tmp_path):
    from steering.store import RunLockedError

    path = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with ResultStore(path) as s:
            with pytest.raises(RunLockedError) as info:
                s.begin_run("r1", SPEC, "m")
            assert f"run 'r1' is being written by another process (pid {holder.pid})" in str(info.value)
            assert "wait for it or use another store" in str(info.value)
            with pytest.raises(RunLockedError):
                s.write_rows([row()])
            assert len(s) == 0
            s.begin_run("r2", SPEC, "m")  # another run of the same store is fine
            s.write_rows([row(run="r2")])
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    with ResultStore(path) as s:  # the holder is gone: the run is free
        s.begin_run("r1", SPEC, "m")
        s.write_rows([row()])
        assert len(s.done_keys("r1")) == 1
    assert not list(tmp_path.glob("*.lock"))  # lock files are removed on close


def test_same_run_in_two_store_objects_of_one_process(tmp_path):
    from steering.store import RunLockedError

    with ResultStore(tmp_path / "s.db") as a, ResultStore(tmp_path / "s.db") as b:
        a.begin_run("r1", SPEC, "m")
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}, this process"):
            b.begin_run("r1", SPEC, "m")
    with ResultStore(tmp_path / "s.db") as c:
        c.begin_run("r1", SPEC, "m")
