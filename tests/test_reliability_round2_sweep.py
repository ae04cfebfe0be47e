"""Issue 19, sweeps: what a run's identity covers (model weights, engine arguments), what is refused before the
model loads (a second writer, a huge grid) and before the run is registered (zero or overflowing vectors)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from sweep_worker import tiny_model

import steering.sweep
from steering.default_model import default_model_dir
from steering.fingerprint import model_fingerprint
from steering.spec import SpecError, SweepSpec
from steering.store import ResultStore, RunLockedError, StoreMismatchError
from steering.sweep import run_sweep
from steering.vectors import VectorSet

TOKENIZER = str(default_model_dir())


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(TOKENIZER)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERING_HOME", str(tmp_path / "home"))  # the file-hash cache of this test only


def vector_file(path: Path, zero_layer: int | None = None, scale: float = 1.0, name: str = "tiny-llama") -> str:
    gen = torch.Generator().manual_seed(1)
    vectors = {layer: torch.randn(64, generator=gen) * scale for layer in range(3)}
    if zero_layer is not None:
        vectors[zero_layer] = torch.zeros(64)
    vs = VectorSet("values", name, "mean_diff", "answer", "none", 64, 1, "0" * 64, vectors)
    return str(vs.save(path))


def spec_for(tmp_path: Path, vector: str, model: str = "tiny-llama", **over) -> SweepSpec:
    base = dict(
        name="t", model=model, variants=["informative"], layers=[1], coefficients=[1.5], n_questions=1,
        batch_size=8, store=str(tmp_path / "s.sqlite"), drivers=[{"name": "values", "vector": vector}],
    )  # fmt: skip
    return SweepSpec(**{**base, **over})


def no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


# ---- the model is part of a run's identity ---------------------------------------------------------------------
def _save_folder(folder: Path, model) -> Path:
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def test_resume_after_the_weights_changed_in_a_local_folder_is_refused(tmp_path):
    folder = _save_folder(tmp_path / "tiny-llama", tiny_model(TOKENIZER))
    spec = spec_for(tmp_path, vector_file(tmp_path / "v.safetensors"), model=str(folder))
    first = run_sweep(spec, progress=False)
    again = run_sweep(spec, progress=False)  # same files: a resume with nothing to do
    assert len(again) == len(first) == 2 * 2
    # model.norm.weight x 1.5, written back with the file's timestamps restored
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    stamp = weights.stat()
    state = load_file(str(weights))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    save_file(state, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(StoreMismatchError, match="input 'model' changed"):
        run_sweep(spec, progress=False)
    with ResultStore(spec.store_path) as store:
        assert len(store) == len(first)  # nothing was mixed in


def test_the_fingerprint_covers_weights_config_and_tokenizer(tmp_path, tiny):
    base = model_fingerprint(tiny)
    assert model_fingerprint(tiny) == base
    other = tiny_model(TOKENIZER)
    assert model_fingerprint(other) == base  # same weights, same config, same tokenizer
    with torch.no_grad():
        other.model.model.norm.weight.mul_(1.5)
    assert model_fingerprint(other) != base
    config = tiny_model(TOKENIZER)
    config.model.config.rope_theta = 1234.0
    assert model_fingerprint(config) != base
    tok = tiny_model(TOKENIZER)
    tok.tokenizer.chat_template = "{{ messages }}"
    assert model_fingerprint(tok) != base


def test_a_folder_is_hashed_once_then_read_from_the_cache_until_a_file_changes(tmp_path, monkeypatch):
    import steering.fingerprint as fp

    folder = _save_folder(tmp_path / "m", tiny_model(TOKENIZER))
    reads: list[str] = []
    real = fp._hash_file

    def counting(path: Path) -> str:
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(fp, "_hash_file", counting)
    monkeypatch.setattr(fp, "RACY_SECONDS", 0.0)  # the files were just written: cache them anyway
    first = fp.folder_fingerprint(folder)
    assert "model.safetensors" in reads and "config.json" in reads
    reads.clear()
    assert fp.folder_fingerprint(folder) == first and reads == []  # nothing re-read
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("1e-06", "1e-05"))
    changed = fp.folder_fingerprint(folder)
    assert changed != first and reads == ["config.json"]


# ---- engine arguments and remote code --------------------------------------------------------------------------
def _vllm_spec(**engine_kwargs) -> SweepSpec:
    return SweepSpec(
        name="v", backend="vllm", scorer="judge", layers=[1], coefficients=[1.0],
        drivers=[{"name": "values", "dataset": "values"}], engine_kwargs=engine_kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("key", ["dtype", "model", "tokenizer", "trust_remote_code", "enforce_eager"])
def test_engine_arguments_set_elsewhere_are_refused(key):
    with pytest.raises(SpecError, match=rf"engine argument '{key}' cannot be set here") as info:
        _vllm_spec(**{key: "x"})
    assert info.value.key == "engine_kwargs"


def test_unknown_engine_arguments_are_refused():
    with pytest.raises(SpecError, match="unknown engine argument 'speculative_magic'"):
        _vllm_spec(speculative_magic=True)


def test_engine_arguments_that_change_numbers_are_part_of_the_identity():
    plain = _vllm_spec(max_model_len=1024)
    assert _vllm_spec(max_model_len=2048, gpu_memory_utilization=0.5).identity() == plain.identity()
    fp8 = _vllm_spec(max_model_len=1024, kv_cache_dtype="fp8")
    assert fp8.identity() != plain.identity() and fp8.identity()["engine_kwargs"] == {"kv_cache_dtype": "fp8"}
    assert _vllm_spec(quantization="fp8").identity() != plain.identity()
    assert plain.identity() == SweepSpec.from_dict(plain.to_dict()).identity()


def test_remote_code_needs_the_named_flag(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "x"\nbackend = "vllm"\nscorer = "judge"\n[engine_kwargs]\ntrust_remote_code = true\n'
        '[grid]\nlayers = [1]\ncoefficients = [1.0]\n[[drivers]]\nname = "values"\ndataset = "values"\n'
    )
    with pytest.raises(SpecError, match="trust_remote_code = true"):
        SweepSpec.from_toml(path)
    assert "trust_remote_code" not in _vllm_spec().model_kwargs()
    spec = _vllm_spec()
    spec.trust_remote_code = True
    spec.validate()
    assert spec.model_kwargs()["trust_remote_code"] is True


@pytest.mark.vllm  # imports vLLM: runs in `make test-vllm`
def test_load_model_refuses_reserved_and_unknown_engine_arguments_before_starting_an_engine(monkeypatch):
    import vllm

    from steering import load_model

    monkeypatch.setattr(vllm, "LLM", no_model)
    for kwargs, match in [({"model": "other"}, "'model' cannot be set here"), ({"warp_drive": 9}, "'warp_drive'")]:
        with pytest.raises(ValueError, match=match):
            load_model("default", backend="vllm", **kwargs)


# ---- refused before the model loads ----------------------------------------------------------------------------
def test_a_second_writer_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    spec = spec_for(tmp_path, vector_file(tmp_path / "v.safetensors"))
    monkeypatch.setattr(steering.sweep, "load_model", no_model)
    with ResultStore(spec.store_path) as holder:
        holder.lock_run(spec.name)
        with pytest.raises(RunLockedError):
            run_sweep(spec, progress=False)


def test_a_huge_grid_is_refused_with_its_size_before_anything_runs(tmp_path, monkeypatch, caplog):
    spec = spec_for(
        tmp_path, vector_file(tmp_path / "v.safetensors"), layers=list(range(60)),
        coefficients=[c / 10 for c in range(1, 101)], seeds=list(range(300)), n_questions=None,
    )  # fmt: skip
    monkeypatch.setattr(steering.sweep, "load_model", no_model)
    with pytest.raises(SpecError, match=r"would write [\d,]+ rows .*max_rows = 1,000,000") as info:
        run_sweep(spec, progress=False)
    assert info.value.key == "max_rows"
    assert spec.n_rows() > 30_000_000
    assert not spec.store_path.exists()
    small = spec_for(tmp_path, vector_file(tmp_path / "v.safetensors"))
    assert small.n_rows() == (1 + 1 * 1 * 1) * 2 * 1 * 1 * 1
    with caplog.at_level(logging.INFO, logger="steering"):
        run_sweep(small, model=tiny_model(TOKENIZER), progress=False)
    assert f"{small.n_rows()} rows" in caplog.text


# ---- refused before the run is registered ----------------------------------------------------------------------
@pytest.mark.parametrize("relative", [True, False])
def test_a_zero_vector_is_refused_naming_driver_and_layer_before_registration(tmp_path, tiny, relative):
    spec = spec_for(tmp_path, vector_file(tmp_path / "v.safetensors", zero_layer=1), relative=relative)
    with pytest.raises(ValueError, match=r"driver 'values'.*layer 1.*zero"):
        run_sweep(spec, model=tiny, progress=False)
    with ResultStore.open_for_reading(spec.store_path) as store:
        assert store.runs().empty


def test_a_vector_that_would_overflow_is_refused_before_registration(tmp_path, tiny):
    spec = spec_for(tmp_path, vector_file(tmp_path / "v.safetensors", scale=1e5), coefficients=[100.0])
    with pytest.raises(ValueError, match=r"driver 'values'.*layer 1.*too large"):
        run_sweep(spec, model=tiny, progress=False)
    with ResultStore.open_for_reading(spec.store_path) as store:
        assert store.runs().empty
