"""``--backend`` on every command that loads a model, and option values that start with a minus (a coefficient
list such as ``-0.5,0,0.5``) read as values, as the README writes them."""

from __future__ import annotations

import pytest

from steering import cli
from steering.cli import _backend

LOADING = {
    "demo": [],
    "info": [],
    "extract": ["--driver", "values", "--out", "v.safetensors"],
    "vectors": ["show", "v.safetensors"],
    "gap": [],
    "sweep": ["--name", "n", "--layers", "9", "--coefficients", "0"],
    "run": ["smoke"],
}


def test_the_backend_choices_are_the_loaders():
    from steering.models.loading import ENGINES
    from steering.models.wrap import BACKENDS

    assert set(_backend.CHOICES) == {*BACKENDS, *ENGINES}


@pytest.mark.parametrize("command", sorted(LOADING))
def test_every_command_that_loads_a_model_takes_backend(command):
    parser = cli.build_parser()
    args = parser.parse_args([command, *LOADING[command], "--backend", "nnsight"])
    assert args.backend == "nnsight"
    default = parser.parse_args([command, *LOADING[command]]).backend
    assert default == (None if command in ("run", "demo") else "hf")  # None: the spec's own backend
    with pytest.raises(SystemExit):
        parser.parse_args([command, *LOADING[command], "--backend", "tensorflow"])


def test_negative_values_read_as_values():
    argv = ["sweep", "--name", "n", "--driver", "values=values", "--layers", "9,15"]
    args = cli.build_parser().parse_args(
        cli.join_negative_values([*argv, "--coefficients", "-0.5,0,0.5", "--relative"])
    )
    assert args.coefficients == "-0.5,0,0.5" and args.relative
    assert cli.join_negative_values(["--coefficients", "-1e-3,-2"]) == ["--coefficients=-1e-3,-2"]
    assert cli.join_negative_values(["--n", "-3", "-v"]) == ["--n=-3", "-v"]
    assert cli.join_negative_values(["-v", "info"]) == ["-v", "info"]  # flags stay flags
    assert cli.join_negative_values(["--out=-x"]) == ["--out=-x"]


def test_sweep_and_run_hand_the_backend_to_the_spec(monkeypatch, capsys):
    import pandas as pd

    import steering.runs
    import steering.sweep

    seen = []
    monkeypatch.setattr(steering.sweep, "run_sweep", lambda spec, **kw: seen.append(spec) or pd.DataFrame())
    monkeypatch.setattr(steering.runs, "run_and_report", lambda spec, **kw: seen.append(spec) or pd.DataFrame())
    argv = ["sweep", "--name", "n", "--driver", "values=values", "--layers", "9", "--coefficients", "-0.5,0,0.5"]
    assert cli.main([*argv, "--backend", "nnsight"]) == 0
    assert seen[-1].backend == "nnsight" and seen[-1].coefficients == [-0.5, 0.0, 0.5]
    assert cli.main(["run", "smoke", "--backend", "transformer_lens"]) == 0
    assert seen[-1].backend == "transformer_lens" and seen[-1].name == "smoke"
    assert cli.main(["run", "smoke"]) == 0
    assert seen[-1].backend == "hf"  # the spec's own
    assert cli.main(["run", "vllm_quickstart", "--backend", "hf"]) == 2  # engine_kwargs need vllm: refused by name
    assert "engine_kwargs" in capsys.readouterr().err
