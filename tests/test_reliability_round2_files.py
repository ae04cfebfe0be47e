"""Issue 19, files: vector files, GGUF control vectors, result stores and their locks, spec files, the CLI."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from steering import cli
from steering.spec import SpecError, SweepSpec
from steering.store import ResultStore, RunLockedError, StoreError, StoreMismatchError
from steering.vectors import FORMAT, VectorSet, VectorTransferWarning

DRIVERS = [{"name": "values", "dataset": "values"}]
SPEC = {"drivers": ["values"], "layers": [3], "coefficients": [0.0, 2.0]}
META = {
    "format": FORMAT,
    "model": "m",
    "driver": "values",
    "method": "mean_diff",
    "position": "answer",
    "normalized": "none",
    "d_model": "4",
    "n_pairs": "1",
    "dataset_sha256": "0" * 64,
    "version": "0",
}


def row(**over):
    base = dict(run="r1", model="m", driver="values", layer=3, coefficient=2.0, variant="base", condition="monitored")
    base.update(question="q1", seed=0, scorer="fc", compliance=0.5, extra="{}")
    return {**base, **over}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- vector files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [("layers.9", "layers.09"), ("layers.09",), ("layers.\u0663",), ("layers.+3",)])
def test_layer_names_must_be_canonical_ascii_integers(tmp_path, names):
    from safetensors.torch import save_file

    path = tmp_path / "v.safetensors"
    save_file({name: torch.full((4,), float(i + 1)) for i, name in enumerate(names)}, str(path), metadata=META)
    with pytest.raises(ValueError, match=r"tensor 'layers\.[^']*'.*layers\.\{i\}"):
        VectorSet.load(path)


def _cvector_gguf(path: Path, directions: dict[int, np.ndarray], hint: str = "llama") -> Path:
    """A control vector as llama.cpp's cvector-generator writes it (int32 layer count, ``direction.N`` from 1)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_int32("controlvector.layer_count", len(directions))
    for n, vector in directions.items():
        writer.add_tensor(f"direction.{n}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_control_vectors_from_elsewhere_are_imported(tmp_path):
    gen = np.random.default_rng(0)
    directions = {n: gen.standard_normal(64).astype(np.float32) for n in (1, 2, 3)}
    path = _cvector_gguf(tmp_path / "honesty.gguf", directions)
    vs = VectorSet.load(path)
    assert vs.layers == [0, 1, 2] and vs.d_model == 64 and vs.driver == "honesty"
    for n, vector in directions.items():
        assert torch.equal(vs[n - 1], torch.from_numpy(vector))
    assert vs.dataset_sha256 == sha(path)  # the content is pinned

    class Model:
        name, d_model, n_layers = "SmolLM2-135M-Instruct", 64, 30

    with pytest.warns(VectorTransferWarning):  # a model hint is not a model name: a warning, not a refusal
        VectorSet.load(path, model=Model())
    Model.d_model = 32
    with pytest.raises(ValueError, match="d_model"):
        VectorSet.load(path, model=Model())


@pytest.mark.parametrize("bad", ["direction.\u0663", "direction.02", "direction.0"])
def test_gguf_tensor_names_must_be_canonical(tmp_path, bad):
    import gguf

    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_tensor("direction.1", np.ones(4, dtype=np.float32))
    writer.add_tensor(bad, np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="direction"):
        VectorSet.load(path)


# ---- result stores ----------------------------------------------------------------------------------------------
def _lock_name(tmp_path: Path, store: Path, run: str = "r1") -> Path:
    with ResultStore(store) as s:
        s.begin_run(run, SPEC, "m")
        (lock,) = tmp_path.glob("*.lock")
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600  # only the owner may write the lock file
    return lock


def test_the_lock_file_never_follows_a_planted_symlink(tmp_path):
    store = tmp_path / "s.db"
    lock = _lock_name(tmp_path, store)
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    lock.symlink_to(victim)
    with ResultStore(store) as s, pytest.raises(StoreError, match=r"lock file .*(symlink|not a regular file)"):
        s.begin_run("r1", SPEC, "m")
    assert victim.read_text() == "do not truncate me"


def test_a_symlinked_store_path_shares_the_real_stores_lock(tmp_path):
    real = tmp_path / "real.db"
    link = tmp_path / "link.db"
    ResultStore(real).close()
    link.symlink_to(real)
    with ResultStore(real) as a, ResultStore(link) as b:
        a.begin_run("r1", SPEC, "m")
        with pytest.raises(RunLockedError):
            b.begin_run("r1", SPEC, "m")


def _foreign(path: Path, table: str = "users(id INTEGER, name TEXT)") -> str:
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {table}")
    conn.execute(f"INSERT INTO {table.split('(')[0]} VALUES (1, 'ada')")
    conn.commit()
    conn.close()
    return sha(path)


@pytest.mark.parametrize("table", ["users(id INTEGER, name TEXT)", "results(id INTEGER, score REAL)"])
def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path, table):
    path = tmp_path / "other.sqlite"
    before = _foreign(path, table)
    with pytest.raises(StoreMismatchError, match="not a steering result store"):
        ResultStore(path)
    assert sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]  # no -wal / -shm / lock left behind
    with pytest.raises(StoreMismatchError, match="not a steering result store") as info:
        ResultStore.open_for_reading(path)
    assert "no such column" not in str(info.value)
    code = cli.main(["report", str(path)])
    assert code == 2 and sha(path) == before


def test_an_empty_sqlite_file_still_becomes_a_store(tmp_path):
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).close()
    with ResultStore(path) as s:
        s.begin_run("r1", SPEC, "m")
        assert s.write_rows([row()]) == 1


def test_a_changed_spec_key_is_named(tmp_path):
    with ResultStore(tmp_path / "s.db") as s:
        s.begin_run("r1", {**SPEC, "judge_url": "http://127.0.0.1:8000/v1"}, "m")
        s.write_rows([row()])
    with ResultStore(tmp_path / "s.db") as s, pytest.raises(StoreMismatchError) as info:
        s.begin_run("r1", {**SPEC, "judge_url": "http://127.0.0.1:9000/v1"}, "m")
    assert "judge_url" in str(info.value) and "9000" in str(info.value)


# ---- spec files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", ".hidden", "x\x00y", "tab\there", " padded"])
def test_run_names_that_would_make_paths_are_refused(name):
    with pytest.raises(SpecError, match="name") as info:
        SweepSpec(name=name, layers=[1], coefficients=[1.0], drivers=DRIVERS)
    assert info.value.key == "name"


def test_good_run_names_pass():
    for name in ("quickstart", "run-2.v1", "paper_llama 70b", "ünïcode"):
        assert SweepSpec(name=name, layers=[1], coefficients=[1.0], drivers=DRIVERS).name == name


def test_relative_input_paths_resolve_against_the_spec_file(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "vec.safetensors").write_bytes(b"x")
    (folder / "pairs.jsonl").write_text("")
    (folder / "spec.toml").write_text(
        'name = "t"\nstore = "out.sqlite"\n[grid]\nlayers = [1]\ncoefficients = [1.0]\n'
        '[[drivers]]\nname = "a"\nvector = "vec.safetensors"\n'
        '[[drivers]]\nname = "b"\ndataset = "pairs.jsonl"\n[[drivers]]\nname = "c"\ndataset = "values"\n'
    )
    monkeypatch.chdir(tmp_path)
    spec = SweepSpec.from_toml("study/spec.toml")
    assert Path(spec.drivers[0].vector) == folder / "vec.safetensors"
    assert Path(spec.drivers[1].dataset) == folder / "pairs.jsonl"
    assert spec.drivers[2].dataset == "values"  # a packaged driver name stays a name
    assert spec.store == "out.sqlite"  # outputs stay relative to where you run


def test_a_spec_with_a_utf8_bom_reads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(
        '\ufeff# Windows editors add a BOM\nname = "t"\n[grid]\nlayers = [1]\ncoefficients = [0.5]\n'
        '[[drivers]]\nname = "values"\ndataset = "values"\n'.encode()
    )
    spec = SweepSpec.from_toml(path)
    assert (spec.name, spec.coefficients) == ("t", [0.5])


@pytest.mark.parametrize("coefficients", [[1e300], [1.0, 1e30], [-1e7]])
def test_coefficients_too_large_to_mean_anything_are_refused_in_the_spec(coefficients):
    with pytest.raises(SpecError, match="coefficients") as info:
        SweepSpec(name="x", layers=[1], coefficients=coefficients, drivers=DRIVERS)
    assert info.value.key == "coefficients"


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["sweep", "--name", "x", "--layers", "1,a", "--coefficients", "1"], "--layers"),
        (["sweep", "--name", "x", "--layers", "1", "--coefficients", "1,x"], "--coefficients"),
        (["sweep", "--name", "x", "--layers", "1", "--coefficients", "1", "--seeds", "0,1.5"], "--seeds"),
        (["sweep", "--name", "x", "--layers", "1", "--coefficients", "1", "--controls", "z"], "--controls"),
        (["gap", "--seeds", "a"], "--seeds"),
    ],
)
def test_bad_numbers_on_the_command_line_name_the_flag(capsys, monkeypatch, argv, flag):
    import steering
    import steering.sweep

    monkeypatch.setattr(steering, "load_model", _no_model)
    monkeypatch.setattr(steering.sweep, "load_model", _no_model)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def test_gap_out_that_cannot_be_written_fails_before_measuring(capsys, monkeypatch, tmp_path):
    import steering

    monkeypatch.setattr(steering, "load_model", _no_model)
    missing = tmp_path / "no-such-folder" / "rows.csv"
    code = cli.main(["gap", "--n", "1", "--out", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "no-such-folder" in err
    code = cli.main(["gap", "--n", "1", "--out", str(tmp_path)])  # a folder, not a file
    assert code == 2 and "--out" in capsys.readouterr().err
    import steering.cli.gap as gap_cli

    monkeypatch.setattr(gap_cli.os, "access", lambda *args: False)  # a read-only folder (as root nothing is)
    code = cli.main(["gap", "--n", "1", "--out", str(tmp_path / "rows.csv")])
    assert code == 2 and "permission denied" in capsys.readouterr().err
