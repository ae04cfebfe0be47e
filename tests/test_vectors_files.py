"""Vector files: safetensors round trip and checks, random controls, GGUF export, the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steering.cli import main
from steering.vectors import FORMAT, VectorSet, VectorTransferWarning, export_gguf, read_gguf

TOKENIZER = Path.home() / ".cache" / "steering" / "models" / "SmolLM2-135M-Instruct"


def _vectorset(d: int = 16, layers=(0, 3, 7), seed: int = 0) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.randn(d, generator=g) * (layer + 1) for layer in layers}
    return VectorSet(
        driver="values",
        model="org/Tiny-Model",
        method="mean_diff",
        position="answer",
        normalized="none",
        d_model=d,
        n_pairs=12,
        dataset_sha256="ab" * 32,
        vectors=vectors,
    )


def test_save_load_round_trips_bit_exactly(tmp_path):
    vs = _vectorset()
    vs.vectors[3][0] = 1e-38  # a subnormal-adjacent value survives too
    path = vs.save(tmp_path / "v.safetensors")
    loaded = VectorSet.load(path)
    assert loaded.layers == vs.layers
    for layer in vs.layers:
        assert loaded[layer].dtype == torch.float32
        assert loaded[layer].numpy().tobytes() == vs[layer].numpy().tobytes()
    assert loaded.metadata() == vs.metadata()
    # the file holds exactly the documented tensors and metadata
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["layers.0", "layers.3", "layers.7"]
        meta = handle.metadata()
    assert meta["format"] == FORMAT == "steering.vectors/1"
    assert set(meta) == {"format", "model", "driver", "method", "position", "normalized", "d_model", "n_pairs",
                         "dataset_sha256", "version"}  # fmt: skip
    assert (meta["d_model"], meta["n_pairs"], meta["normalized"]) == ("16", "12", "none")
    # saving the loaded set again gives the same vectors
    again = VectorSet.load(loaded.save(tmp_path / "w.safetensors"))
    assert all(torch.equal(again[layer], vs[layer]) for layer in vs.layers)


def test_load_checks_the_model(tmp_path):
    path = _vectorset().save(tmp_path / "v.safetensors")
    same = SimpleNamespace(name="Tiny-Model", d_model=16, n_layers=8)  # basename of "org/Tiny-Model" matches
    assert VectorSet.load(path, model=same).layers == [0, 3, 7]
    with pytest.raises(ValueError, match="d_model=16 but model 'other' has d_model=32"):
        VectorSet.load(path, model=SimpleNamespace(name="other", d_model=32), strict=False)
    other = SimpleNamespace(name="Other-Model", d_model=16, n_layers=8)
    with pytest.raises(ValueError, match="pass strict=False"):
        VectorSet.load(path, model=other)
    with pytest.warns(VectorTransferWarning, match="'org/Tiny-Model' but are applied to 'Other-Model'"):
        loaded = VectorSet.load(path, model=other, strict=False)
    assert loaded.layers == [0, 3, 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", VectorTransferWarning)
        VectorSet.load(path, model=other, strict=False)  # silenced by a filter, no error
    with pytest.raises(ValueError, match="has 4 layers"):
        VectorSet.load(path, model=SimpleNamespace(name="Tiny-Model", d_model=16, n_layers=4))


def _raw_file(path, tensors, **meta_changes):
    meta = _vectorset().metadata()
    meta.update(meta_changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_load_rejects_bad_files(tmp_path):
    good = {f"layers.{i}": torch.ones(16) for i in (0, 3)}
    nan = dict(good, **{"layers.3": torch.tensor([float("nan")] + [0.0] * 15)})
    with pytest.raises(ValueError, match="layers.3 contains NaN or inf"):
        VectorSet.load(_raw_file(tmp_path / "nan.safetensors", nan))
    inf = dict(good, **{"layers.0": torch.full((16,), float("inf"))})
    with pytest.raises(ValueError, match="layers.0 contains NaN or inf"):
        VectorSet.load(_raw_file(tmp_path / "inf.safetensors", inf))
    with pytest.raises(ValueError, match="metadata format is 'other/2'"):
        VectorSet.load(_raw_file(tmp_path / "fmt.safetensors", good, format="other/2"))
    with pytest.raises(ValueError, match="metadata format is None"):
        VectorSet.load(_raw_file(tmp_path / "nofmt.safetensors", good, format=None))
    with pytest.raises(ValueError, match="metadata lacks dataset_sha256"):
        VectorSet.load(_raw_file(tmp_path / "nosha.safetensors", good, dataset_sha256=None))
    with pytest.raises(ValueError, match=r"float32 \[16\]"):
        VectorSet.load(_raw_file(tmp_path / "half.safetensors", {"layers.0": torch.ones(16, dtype=torch.float16)}))
    with pytest.raises(ValueError, match="unexpected tensor 'weight'"):
        VectorSet.load(_raw_file(tmp_path / "extra.safetensors", dict(good, weight=torch.ones(16))))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        VectorSet.load(junk)
    with pytest.raises(ValueError, match="does not exist"):
        VectorSet.load(tmp_path / "missing.safetensors")


def test_vectorset_validates_and_indexes():
    vs = _vectorset()
    assert vs[3].shape == (16,) and 3 in vs and 4 not in vs and len(vs) == 3
    with pytest.raises(KeyError, match="has layers"):
        vs[4]
    with pytest.raises(ValueError, match=r"expected \[8\]"):
        VectorSet("v", "m", "mean_diff", "answer", "unit", 8, 1, "x", {0: torch.ones(9)})
    with pytest.raises(ValueError, match="NaN or inf"):
        VectorSet("v", "m", "mean_diff", "answer", "unit", 2, 1, "x", {0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="no quality table"):
        vs.best_layers(1)


def test_random_like_matches_norms_not_directions():
    vs = _vectorset(d=256)
    control = vs.random_like(seed=5)
    assert control.driver == "random-5" and control.layers == vs.layers and control.model == vs.model
    for layer in vs.layers:
        assert control.norms()[layer] == pytest.approx(vs.norms()[layer], rel=1e-6)
        cosine = torch.nn.functional.cosine_similarity(control[layer], vs[layer], dim=0)
        assert abs(float(cosine)) < 0.3
    assert torch.equal(vs.random_like(5)[3], control[3])
    assert not torch.equal(vs.random_like(6)[3], control[3])
    assert not torch.equal(control[0] / control.norms()[0], control[3] / control.norms()[3])


def test_gguf_round_trip(tmp_path):
    vs = _vectorset()
    path = export_gguf(vs, tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "org/Tiny-Model"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 3
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.4", "direction.8"]  # llama.cpp counts layers from 1
    for layer in vs.layers:
        got = tensors[f"direction.{layer + 1}"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.reshape(-1), vs[layer].numpy())
    meta, vectors = read_gguf(path)
    assert meta["controlvector.layer_count"] == 3 and sorted(vectors) == vs.layers


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_show_and_export(tmp_path, capsys):
    path = _vectorset().save(tmp_path / "v.safetensors")
    assert main(["vectors", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format          steering.vectors/1" in out
    assert f"    7  {_vectorset().norms()[7]:.4f}" in out
    assert main(["vectors", "export-gguf", str(path), str(tmp_path / "v.gguf")]) == 0
    assert sorted(read_gguf(tmp_path / "v.gguf")[1]) == [0, 3, 7]
    _raw_file(tmp_path / "bad.safetensors", {"layers.0": torch.ones(16)}, format="x")
    assert main(["vectors", "show", str(tmp_path / "bad.safetensors")]) == 2
    assert "metadata format is 'x'" in capsys.readouterr().err


def test_cli_extract_on_a_tiny_local_model(tmp_path, capsys):
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("the default model's tokenizer is not cached; run `steering fetch`")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer))  # fmt: skip
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "toy.jsonl"
    lines = []
    for i in range(6):
        good, bad = ("(A)", "(B)") if i % 2 else ("(B)", "(A)")
        lines.append({"id": str(i), "split": "test" if i >= 4 else "train", "question": f"Q{i}\n(A) a\n(B) b",
                      "answer_matching_behavior": good, "answer_not_matching_behavior": bad})  # fmt: skip
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "toy.safetensors"
    args = ["extract", "--model", str(folder), "--driver", str(data), "--layers", "0,2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out quality (2 test pairs" in printed and "best layers:" in printed
    vs = VectorSet.load(out)
    assert (vs.driver, vs.layers, vs.n_pairs, vs.normalized) == ("toy", [0, 2], 4, "unit")
    from steering.vectors import dataset_sha256

    assert vs.dataset_sha256 == dataset_sha256(data)
    assert main(["extract", "--model", str(folder), "--driver", "nope", "--out", str(out)]) == 2
    assert "neither a driver" in capsys.readouterr().err
