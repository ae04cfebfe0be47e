"""Result store: one SQLite row per result key, written batch by batch so a killed sweep resumes losslessly.

The store is a single SQLite file in WAL mode. Each `write_rows` call is one transaction (all rows or none),
and rows are keyed so that rerunning a batch replaces rather than duplicates it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd

from steering.scenario import CONDITIONS

try:
    import fcntl
except ImportError:  # not on POSIX: runs are not locked against a second writer
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the table layout; a store or run written with another version is refused, never mixed."""

KEY_COLUMNS: tuple[str, ...] = (
    "run",
    "model",
    "driver",
    "layer",
    "coefficient",
    "variant",
    "condition",
    "question",
    "seed",
    "scorer",
)
"""Columns that identify one result row, in the order used by `done_keys` tuples."""

VALUE_COLUMNS: tuple[str, ...] = ("compliance", "extra")
COLUMNS: tuple[str, ...] = KEY_COLUMNS + VALUE_COLUMNS

_CONDITIONS_SQL = ", ".join(f"'{c}'" for c in CONDITIONS)
_INT_KEYS = frozenset({"layer", "seed"})
_FLOAT_KEYS = frozenset({"coefficient"})

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    format_version INTEGER NOT NULL,
    model TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    inputs_json TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS results (
    run TEXT NOT NULL REFERENCES runs(run),
    model TEXT NOT NULL,
    driver TEXT NOT NULL,
    layer INTEGER NOT NULL,
    coefficient REAL NOT NULL,
    variant TEXT NOT NULL,
    condition TEXT NOT NULL CHECK (condition IN ({_CONDITIONS_SQL})),
    question TEXT NOT NULL,
    seed INTEGER NOT NULL,
    scorer TEXT NOT NULL,
    compliance REAL CHECK (compliance IS NULL OR (compliance >= 0 AND compliance <= 1)),
    extra TEXT NOT NULL DEFAULT '{{}}',
    PRIMARY KEY ({", ".join(KEY_COLUMNS)})
) WITHOUT ROWID;
"""


class StoreError(RuntimeError):
    """The store file cannot be opened or written (path, permissions, full disk); nothing partial was kept."""


class StoreMismatchError(ValueError):
    """A run or store already exists with a different spec, format or inputs; results would be mixed."""


class RunLockedError(StoreError):
    """Another process (or another open store object) is writing the same run of the same store."""


_CORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("run", "spec_json", "spec_hash", "format_version", "model"),
    "results": KEY_COLUMNS + ("compliance", "extra"),
}
"""Tables and columns every steering store has had since format 1: a SQLite file without them is someone else's."""

LATE_INPUTS = frozenset({"model"})
"""Inputs recorded since a later version: a run registered before they were recorded gets them recorded on its next
resume (its old rows cannot be checked against them) instead of being refused as using a new input."""

RUN_COLUMNS: tuple[str, ...] = (
    "run",
    "spec_json",
    "spec_hash",
    "format_version",
    "model",
    "versions_json",
    "created_at",
    "inputs_json",
)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no whitespace), so equal specs hash equally."""
    return hashlib.sha256(_canonical_json(spec, "spec").encode("utf-8")).hexdigest()


def _canonical_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be JSON-serialisable with finite numbers (convert paths, numpy values and "
            f"tuples to str / float / list first): {exc}"
        ) from exc


def _input_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """What differs between the inputs recorded for a run and those given now (inputs only one side has are
    fine when the run recorded none: a run from before inputs were recorded)."""
    changes = []
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            changes.append(f"input {key!r} changed (sha256 {old[key][:12]} -> {new[key][:12]})")
    if old:
        changes += [f"input {key!r} was used by the run but is not given now" for key in sorted(set(old) - set(new))]
        changes += [
            f"input {key!r} is new (the run did not use it)" for key in sorted(set(new) - set(old) - LATE_INPUTS)
        ]
    return changes


def _spec_changes(old_json: str, new_json: str) -> str:
    """The top-level spec keys that differ between two canonical spec JSONs, with both values (shortened)."""
    try:
        old, new = json.loads(old_json), json.loads(new_json)
    except (TypeError, ValueError):
        return ""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return ""

    def show(spec: dict, key: str) -> str:
        text = repr(spec[key]) if key in spec else "(absent)"
        return text if len(text) <= 80 else text[:77] + "..."

    keys = sorted(k for k in set(old) | set(new) if old.get(k, ...) != new.get(k, ...))
    return "; ".join(f"spec key {k!r}: {show(old, k)} -> {show(new, k)}" for k in keys)


def _normalise_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Validate one row dict and return it as a tuple in COLUMNS order, with plain Python types."""
    missing = [c for c in KEY_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"result row lacks key column(s) {missing}; every row needs {list(KEY_COLUMNS)}")
    out: list[Any] = []
    for col in KEY_COLUMNS:
        value = row[col]
        if col in _INT_KEYS:
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"row column {col!r} must be an integer, got {value!r}")
            out.append(int(value))
        elif col in _FLOAT_KEYS:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"row column {col!r} must be a finite number, got {value!r}")
            out.append(number + 0.0)  # -0.0 -> 0.0 so both spellings share one key
        else:
            if value is None:
                raise ValueError(f"row column {col!r} must be a string, got None")
            out.append(str(value))
    if out[KEY_COLUMNS.index("condition")] not in CONDITIONS:
        raise ValueError(f"row condition must be one of {CONDITIONS}, got {row['condition']!r}")
    compliance = row.get("compliance")
    if compliance is not None:
        compliance = float(compliance)
        if math.isnan(compliance):
            compliance = None
        elif not 0.0 <= compliance <= 1.0:
            raise ValueError(f"row compliance must lie in [0, 1] or be None (unjudged), got {compliance!r}")
    out.append(compliance)
    extra = row.get("extra", "{}")
    if extra is None:
        extra = "{}"
    if isinstance(extra, str):
        try:
            json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"row extra must be JSON text or a dict, got invalid JSON {extra!r}") from exc
    else:
        extra = _canonical_json(extra, "row extra")
    out.append(extra)
    return tuple(out)


class ResultStore:
    """SQLite store of sweep results; use as a context manager or call `close()`.

    Open with `readonly=True` (or `ResultStore.open_for_reading(path)`) to read a store without creating
    anything: while a sweep writes it, or a finished store in a folder you cannot write (then SQLite opens it
    `immutable`, since it cannot create the `-shm` file a WAL reader needs there).

    A writer locks each run it registers or writes (`begin_run`, `write_rows`) until `close()`: a lock file
    `<store>.<run>-<hash>.lock` beside the store, held with `flock`, so a second process writing the same run
    of the same store is refused (`RunLockedError`) instead of interleaving rows.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.immutable = False
        self._conn: sqlite3.Connection | None = None
        self._locks: dict[str, tuple[int, Path]] = {}
        self._check_path()
        try:
            if readonly:
                self.immutable = not os.access(self.path.resolve().parent, os.W_OK | os.X_OK)
                if self.immutable:
                    self._check_no_pending_log()
                query = "mode=ro&immutable=1" if self.immutable else "mode=ro"
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, timeout=timeout)
            else:
                conn = sqlite3.connect(self.path, timeout=timeout)
            conn.isolation_level = None  # explicit BEGIN / COMMIT below
            self._conn = conn
            self._check_is_store()  # before anything is written: never modify another program's SQLite file
            if not readonly:
                self._setup()
            self._check_format()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open result store {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_for_reading(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> ResultStore:
        """Open an existing store read-only (also in a read-only folder); it creates and locks nothing."""
        return cls(path, readonly=True, timeout=timeout)

    # -- opening ---------------------------------------------------------------------------------------------

    def _check_path(self) -> None:
        parent = self.path.resolve().parent
        where = f"cannot open result store {self.path}"
        if not parent.exists():
            raise StoreError(f"{where}: directory {parent} does not exist; create it or choose another path")
        if not parent.is_dir():
            raise StoreError(f"{where}: {parent} is not a directory; choose a path inside a directory")
        if self.path.is_dir():
            raise StoreError(f"{where}: it is a directory; give a file path such as {self.path / 'results.db'}")
        if self.readonly:
            if not self.path.exists():
                raise StoreError(f"{where}: the file does not exist (read-only open creates nothing)")
            return
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(
                f"{where}: directory {parent} is not writable (SQLite needs to create the store and its "
                f"-wal / -shm files there); choose a writable directory or open with readonly=True"
            )
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"{where}: the file is read-only; make it writable or open with readonly=True")

    def _check_no_pending_log(self) -> None:
        """An immutable open ignores the write-ahead log: refuse rather than silently miss its rows."""
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"cannot open result store {self.path} read-only: its folder is not writable and it has a "
                f"write-ahead log {wal.name} that was never merged (the writer was killed); copy both files to a "
                "writable folder and open the copy"
            )

    def _setup(self) -> None:
        conn = self._connection
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if "inputs_json" not in self._run_columns():  # a store written before inputs were recorded
                conn.execute("ALTER TABLE runs ADD COLUMN inputs_json TEXT NOT NULL DEFAULT '{}'")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _check_is_store(self) -> None:
        """Refuse a SQLite file that is not a steering store (it has tables, but not ours with our columns)."""
        conn = self._connection
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return  # an empty database: it becomes a store
        problems = []
        for table, columns in _CORE_COLUMNS.items():
            if table not in tables:
                problems.append(f"no table {table!r}")
                continue
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in columns if c not in have]
            if missing:
                problems.append(f"table {table!r} lacks column(s) {', '.join(missing)}")
        if problems:
            raise StoreMismatchError(
                f"{self.path} is not a steering result store: it is a SQLite file with table(s) "
                f"{', '.join(sorted(tables))} ({'; '.join(problems)}); it was left untouched: choose another file "
                "for the store"
            )

    def _check_format(self) -> None:
        (version,) = self._connection.execute("PRAGMA user_version").fetchone()
        if version not in (0, FORMAT_VERSION):
            raise StoreMismatchError(
                f"result store {self.path} has format version {version}, this code writes {FORMAT_VERSION}; "
                f"use a new store file (or the steering version that wrote it)"
            )

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"result store {self.path} is closed; open a new ResultStore")
        return self._conn

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (SQLITE_FULL)
                conn.execute("ROLLBACK")

    def _fail(self, exc: sqlite3.Error, doing: str) -> StoreError:
        message = str(exc)
        hint = ""
        if "full" in message.lower():
            hint = "; free disk space or move the store to another disk, then rerun (done rows are kept)"
        elif "readonly" in message.lower() or "read-only" in message.lower():
            hint = "; the store or its directory is read-only: choose a writable location"
        elif "locked" in message.lower() or "busy" in message.lower():
            hint = "; another process holds the store: wait for it or use another store file"
        return StoreError(f"result store {self.path}: {doing} failed ({message}); nothing was written{hint}")

    # -- runs ------------------------------------------------------------------------------------------------

    def _run_columns(self) -> list[str]:
        return [row[1] for row in self._connection.execute("PRAGMA table_info(runs)")]

    def begin_run(
        self,
        run: str,
        spec: Mapping[str, Any],
        model: str,
        versions: Mapping[str, Any] | None = None,
        *,
        inputs: Mapping[str, str] | None = None,
    ) -> None:
        """Register `run`, or check that an existing run has the same spec, model, format and inputs (resume).

        `inputs` maps a name to the content hash of each file the run reads, e.g.
        `{"vector:values": file_sha256(path), "dataset:values": dataset_sha256("values")}`; on resume every
        input recorded for the run must hash the same, or `StoreMismatchError` names the one that changed.
        An existing run that differs but has no rows yet is re-registered (logged): it holds nothing to mix.
        Locks the run for this store object until `close()` (see the class docstring).
        """
        if not run or not isinstance(run, str):
            raise ValueError("run name must be a non-empty string")
        if self.readonly:
            raise StoreError(f"result store {self.path} was opened read-only; open it with readonly=False")
        spec_json = _canonical_json(spec, "spec")
        digest = hashlib.sha256(spec_json.encode("utf-8")).hexdigest()
        versions_json = _canonical_json(dict(versions or {}), "versions")
        new_inputs = {str(k): str(v) for k, v in dict(inputs or {}).items()}
        inputs_json = _canonical_json(new_inputs, "inputs")
        self._lock_run(run)
        conn = self._connection
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        row = (run, spec_json, digest, FORMAT_VERSION, str(model), versions_json, created, inputs_json)
        insert = f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' for _ in row)})"
        problems: list[str] = []
        changed: list[str] = []
        n_rows = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            found = conn.execute(
                "SELECT spec_hash, format_version, model, inputs_json, spec_json FROM runs WHERE run = ?", (run,)
            ).fetchone()
            if found is None:
                conn.execute(insert, row)
            else:
                old_hash, old_format, old_model, old_inputs_json, old_spec_json = found
                if old_hash != digest:
                    keys = _spec_changes(old_spec_json, spec_json)
                    problems.append(f"spec hash {old_hash[:12]} != {digest[:12]}" + (f": {keys}" if keys else ""))
                if old_format != FORMAT_VERSION:
                    problems.append(f"format version {old_format} != {FORMAT_VERSION}")
                if old_model != str(model):
                    problems.append(f"model {old_model!r} != {model!r}")
                old_inputs = json.loads(old_inputs_json or "{}")
                changed = _input_changes(old_inputs, new_inputs)
                (n_rows,) = conn.execute("SELECT COUNT(*) FROM results WHERE run = ?", (run,)).fetchone()
                if (problems or changed) and n_rows == 0:
                    log.warning(
                        "run %r in %s was registered with a different setup (%s) but has no rows; "
                        "replacing its registration",
                        run,
                        self.path,
                        "; ".join(problems + changed),
                    )
                    conn.execute(insert, row)
                    problems, changed = [], []
                elif not (problems or changed) and set(new_inputs) - set(old_inputs):
                    # first record of inputs: a run registered before inputs were recorded
                    conn.execute("UPDATE runs SET inputs_json = ? WHERE run = ?", (inputs_json, run))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._fail(exc, f"registering run {run!r}") from exc
        except BaseException:
            self._rollback()
            raise
        if problems:
            raise StoreMismatchError(
                f"run {run!r} already exists in {self.path} with a different setup "
                f"({'; '.join(problems + changed)}); refusing to mix results: use a new run name or a new store"
            )
        if changed:
            raise StoreMismatchError(
                f"run {run!r} in {self.path} has {n_rows} rows computed from other inputs: {'; '.join(changed)}; "
                f"refusing to mix results: use a new run name, or delete the store {self.path} (or restore the "
                "original files) to continue"
            )

    def runs(self) -> pd.DataFrame:
        """All registered runs, one row each, with their spec, version and input-hash JSON."""
        have = self._run_columns()
        cols = [c for c in RUN_COLUMNS if c in have]
        rows = self._connection.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY run").fetchall()
        df = pd.DataFrame(rows, columns=cols)
        if "inputs_json" not in df.columns:  # a store from before inputs were recorded, opened read-only
            df["inputs_json"] = "{}"
        return df[list(RUN_COLUMNS)]

    def run_inputs(self, run: str) -> dict[str, str]:
        """The input hashes recorded for `run` ({} when none were, or the run is unknown)."""
        if "inputs_json" not in self._run_columns():
            return {}
        found = self._connection.execute("SELECT inputs_json FROM runs WHERE run = ?", (run,)).fetchone()
        return json.loads(found[0]) if found else {}

    # -- locks -----------------------------------------------------------------------------------------------

    def lock_run(self, run: str) -> None:
        """Lock ``run`` for this store object until ``close()``, as ``begin_run`` / ``write_rows`` do: call it before
        slow work (loading a model) so a second writer is refused at once (``RunLockedError``)."""
        if self.readonly:
            raise StoreError(f"result store {self.path} was opened read-only; open it with readonly=False")
        self._lock_run(run)

    def _lock_path(self, run: str) -> Path:
        """Beside the store's real file (symlinks resolved), so every path to one store shares one lock."""
        real = self.path.resolve()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run)[:40]
        digest = hashlib.sha256(run.encode("utf-8")).hexdigest()[:8]
        return real.with_name(f"{real.name}.{slug}-{digest}.lock")

    def _open_lock(self, path: Path) -> int:
        """Open (or create, mode 0600) the lock file without following a symlink; refuse anything but a regular file
        with one link, so a planted symlink or hard link cannot make us truncate another file."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(
                    f"result store {self.path}: the run lock file {path} is a symlink, which is never followed; "
                    "remove it and rerun"
                ) from None
            raise StoreError(f"result store {self.path}: cannot create the run lock file {path}: {exc}") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise StoreError(
                f"result store {self.path}: the run lock file {path} is not a regular file of its own (a device, "
                "folder or hard link); remove it and rerun"
            )
        return fd

    def _lock_run(self, run: str) -> None:
        """Hold an exclusive flock on the run's lock file until close(); refuse at once if another holds it."""
        if fcntl is None or run in self._locks:
            return
        path = self._lock_path(run)
        while True:
            fd = self._open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                who = f"pid {holder}" + (", this process" if holder == str(os.getpid()) else "")
                raise RunLockedError(
                    f"run {run!r} is being written by another process ({who}) in {self.path}; wait for it or "
                    f"use another store"
                ) from None
            try:  # the holder may have unlinked the file between our open and flock: lock the current file
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # a stale lock file from an older version may be 0644
            os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._locks[run] = (fd, path)

    def _unlock_all(self) -> None:
        locks, self._locks = self._locks, {}
        for fd, path in locks.values():
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding the lock, so nobody locks a file that is about to vanish
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the flock

    # -- rows ------------------------------------------------------------------------------------------------

    def done_keys(self, run: str, *, judged_only: bool = True) -> set[tuple[Any, ...]]:
        """Key tuples (KEY_COLUMNS order) of `run` that are done: stored with a compliance value. Rows stored
        unjudged (compliance NULL, e.g. the judge endpoint failed) are not done, so a rerun scores them again;
        `judged_only=False` returns every stored key."""
        sql = f"SELECT {', '.join(KEY_COLUMNS)} FROM results WHERE run = ?"
        if judged_only:
            sql += " AND compliance IS NOT NULL"
        return set(self._connection.execute(sql, (run,)).fetchall())

    def unjudged_count(self, run: str | None = None) -> int:
        """Rows stored without a compliance value (unjudged), of `run` or of every run."""
        sql = "SELECT COUNT(*) FROM results WHERE compliance IS NULL"
        params: tuple[Any, ...] = ()
        if run is not None:
            sql += " AND run = ?"
            params = (run,)
        (count,) = self._connection.execute(sql, params).fetchone()
        return int(count)

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert or replace `rows` in one transaction (all or nothing); returns the number written."""
        values = [_normalise_row(row) for row in rows]
        if not values:
            return 0
        if self.readonly:
            raise StoreError(f"result store {self.path} was opened read-only; open it with readonly=False")
        for run in sorted({v[0] for v in values}):
            self._lock_run(run)
        conn = self._connection
        placeholders = ", ".join("?" for _ in COLUMNS)
        try:
            conn.execute("BEGIN IMMEDIATE")
            known = {r for (r,) in conn.execute("SELECT run FROM runs")}
            unknown = sorted({v[0] for v in values} - known)
            if unknown:
                conn.execute("ROLLBACK")
                raise ValueError(f"rows name unregistered run(s) {unknown}; call begin_run(...) first")
            conn.executemany(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})", values)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._fail(exc, f"writing {len(values)} rows") from exc
        except BaseException:
            self._rollback()
            raise
        return len(values)

    def frame(self, run: str | None = None) -> pd.DataFrame:
        """Result rows as a DataFrame sorted by key (compliance NaN where unjudged), optionally of one run."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM results"
        params: tuple[Any, ...] = ()
        if run is not None:
            sql += " WHERE run = ?"
            params = (run,)
        sql += f" ORDER BY {', '.join(KEY_COLUMNS)}"
        rows = self._connection.execute(sql, params).fetchall()
        df = pd.DataFrame(rows, columns=list(COLUMNS))
        df = df.astype({"layer": "int64", "seed": "int64", "coefficient": "float64", "compliance": "float64"})
        for col in ("run", "model", "driver", "variant", "condition", "question", "scorer", "extra"):
            df[col] = df[col].astype(object)
        return df

    def export(self, path: str | os.PathLike[str], run: str | None = None) -> Path:
        """Write the rows to `.parquet` or `.csv` (chosen by the file suffix); returns the path."""
        target = Path(path)
        suffix = target.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise ValueError(f"cannot export to {target}: use a .parquet or .csv file name")
        if not target.resolve().parent.is_dir():
            raise StoreError(f"cannot export to {target}: directory {target.parent} does not exist; create it")
        df = self.frame(run)
        if suffix == ".parquet":
            df.to_parquet(target, index=False)
        else:
            df.to_csv(target, index=False)
        return target

    def __len__(self) -> int:
        (count,) = self._connection.execute("SELECT COUNT(*) FROM results").fetchone()
        return int(count)

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection and release the run locks (idempotent); rolls back any open transaction first."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                conn.close()
        finally:
            self._unlock_all()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else ("read-only" if self.readonly else "open")
        return f"ResultStore({str(self.path)!r}, {state})"
