"""Sweep specs: every field's type and value is checked on construction, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from steering.spec import DriverSpec, SpecError, SweepSpec
from steering.store import spec_hash

BASE = {"name": "x", "layers": [1], "coefficients": [0.5], "drivers": [{"name": "values", "dataset": "values"}]}


def toml_spec(tmp_path: Path, top: str = "", grid: str = "", questions: str = "") -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(
        f'name = "t"\n{top}\n[grid]\nlayers = [1, 2]\ncoefficients = [-1.0, 0, 1.0]\n{grid}\n'
        f'[questions]\nset = "animal_welfare"\nn = 2\n{questions}\n'
        '[[drivers]]\nname = "values"\ndataset = "values"\n'
    )
    return path


@pytest.mark.parametrize(
    ("over", "key", "fragment"),
    [
        ({"relative": "no"}, "relative", "expected true or false, got 'no'"),  # ran as relative=True before
        ({"variants": "informative"}, "variants", "expected a list of non-empty strings, got 'informative'"),
        ({"layers": 9}, "layers", "expected a list of integers, got 9"),
        ({"seeds": 0}, "seeds", "expected a list of integers, got 0"),
        ({"n_questions": "1"}, "n_questions", "expected an integer > 0 or None, got '1'"),
        ({"batch_size": "40"}, "batch_size", "expected an integer > 0, got '40'"),
        ({"batch_size": 0}, "batch_size", "greater than 0"),
        ({"coefficients": [0.5, True]}, "coefficients", "[1]: expected a list of numbers, got True"),
        ({"coefficients": [float("nan")]}, "coefficients", "finite number"),
        ({"layers": [1, 1]}, "layers", "1 is listed twice"),
        ({"variants": ["informatve"]}, "variants", "unknown variant 'informatve'"),
        ({"positions": "respons"}, "positions", "one of all, prompt, response, generated"),
        ({"dtype": "float33"}, "dtype", "torch dtype"),
        ({"judge_timeout": -1}, "judge_timeout", "greater than 0"),
        ({"judge_retries": 1.5}, "judge_retries", "expected an integer >= 0, got 1.5"),
        ({"judge": "gpt"}, "judge", "one of keyword, local, endpoint"),
        ({"scorer": "judge", "judge": "endpoint"}, "judge_url", "OpenAI-compatible base URL"),
        ({"judge_url": "localhost:8000/v1"}, "judge_url", "http:// or https://"),
        ({"name": ""}, "name", "non-empty string"),
        ({"drivers": "values"}, "drivers", "list of driver tables"),
    ],
)
def test_bad_field_is_refused_naming_the_key(over, key, fragment):
    with pytest.raises(SpecError) as info:
        SweepSpec(**{**BASE, **over})
    assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize(
    ("driver", "key", "fragment"),
    [
        ({"name": "v", "dataset": "values", "n_pairs": "3"}, "n_pairs", "expected an integer > 0 or None, got '3'"),
        ({"name": "v", "dataset": "values", "method": "svm"}, "method", "one of mean_diff, pca, probe"),
        ({"name": "v", "dataset": "values", "normalize": "l2"}, "normalize", "one of unit, none, residual"),
        ({"name": 3, "dataset": "values"}, "name", "expected a non-empty string, got 3"),
    ],
)
def test_bad_driver_field_is_refused_naming_the_key(driver, key, fragment):
    with pytest.raises(SpecError) as info:
        SweepSpec(**{**BASE, "drivers": [driver]})
    assert info.value.key == key and fragment in str(info.value)
    with pytest.raises(SpecError, match=key):
        DriverSpec(**driver)


def test_toml_errors_name_the_file_key_and_table(tmp_path):
    with pytest.raises(SpecError) as info:
        SweepSpec.from_toml(toml_spec(tmp_path, grid='relative = "no"'))
    assert str(tmp_path / "spec.toml") in str(info.value) and "'relative'" in str(info.value)
    assert "[grid] relative" in str(info.value)
    with pytest.raises(SpecError) as info:
        SweepSpec.from_toml(_with(tmp_path, "n = 2", 'n = "1"'))
    assert info.value.key == "n_questions" and "[questions] n" in str(info.value) and "got '1'" in str(info.value)
    with pytest.raises(SpecError, match="'batch_size'.*got '40'"):
        SweepSpec.from_toml(toml_spec(tmp_path, top='batch_size = "40"'))
    with pytest.raises(SpecError, match="'layers'.*got 9"):
        SweepSpec.from_toml(_with(tmp_path, "layers = [1, 2]", "layers = 9"))


def _with(tmp_path: Path, old: str, new: str) -> Path:
    path = toml_spec(tmp_path)
    path.write_text(path.read_text().replace(old, new))
    return path


def test_negative_layers_are_accepted_unresolved():
    spec = SweepSpec(**{**BASE, "layers": [-1, 3]})
    assert spec.layers == [-1, 3]


def test_judge_options_from_toml(tmp_path):
    spec = SweepSpec.from_toml(
        toml_spec(
            tmp_path,
            top='scorer = "judge"\njudge = "endpoint"\njudge_url = "http://127.0.0.1:8000/v1"\n'
            "judge_timeout = 12.5\njudge_retries = 0",
        )
    )
    assert (spec.judge_timeout, spec.judge_retries, spec.judge_allow_insecure) == (12.5, 0, False)
    assert spec.to_dict()["judge_timeout"] == 12.5 and "judge_timeout" not in spec.identity()
    default = SweepSpec(**BASE)
    assert (default.judge_timeout, default.judge_retries) == (60.0, 3)


def test_defaults_keep_the_spec_hash_of_older_specs():
    """Operational keys at their defaults stay out of to_dict, so a run registered before they existed resumes."""
    spec = SweepSpec(**BASE)
    old_keys = {
        "name", "model", "dtype", "device", "backend", "drivers", "control_seeds", "control_like", "layers",
        "coefficients", "relative", "positions", "variants", "conditions", "setting", "questions", "n_questions",
        "scorer", "seeds", "batch_size", "max_new_tokens", "judge", "judge_model", "judge_url", "store", "format",
    }  # fmt: skip
    assert set(spec.to_dict()) == old_keys
    assert spec_hash(spec.to_dict()) == spec_hash(SweepSpec(**BASE, judge_timeout=5.0).identity())
    assert SweepSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()


def test_validate_after_editing_fields():
    spec = SweepSpec(**BASE)
    spec.variants = "informative"
    with pytest.raises(SpecError, match="'variants'"):
        spec.validate()


def test_positions_match_the_hooks_modes():
    from steering.hooks.positions import MODES
    from steering.spec import POSITIONS

    assert set(POSITIONS) == set(MODES)


def test_packaged_specs_still_parse():
    from steering.experiments import spec_path

    for name in ("quickstart", "smoke", "strengths", "layers", "ablations", "paper_olmo", "paper_gemma", "paper_llama"):
        SweepSpec.from_toml(spec_path(name))


def test_input_hashes_pin_every_file_the_run_reads(tmp_path):
    from steering.vectors import dataset_sha256, file_sha256

    vector = tmp_path / "v.safetensors"
    vector.write_bytes(b"one")
    drivers = [{"name": "values", "vector": str(vector)}, {"name": "gg", "dataset": "goal_guarding"}]
    spec = SweepSpec(**{**BASE, "drivers": drivers, "variants": ["base", "informative"]})
    hashes = spec.input_hashes()
    assert set(hashes) == {"vector:values", "dataset:gg", "questions", "setting"}
    assert hashes["vector:values"] == file_sha256(vector) and hashes["dataset:gg"] == dataset_sha256("goal_guarding")
    vector.write_bytes(b"two")
    again = spec.input_hashes()
    assert again["vector:values"] != hashes["vector:values"]
    assert {k: v for k, v in again.items() if k != "vector:values"} == {
        k: v for k, v in hashes.items() if k != "vector:values"
    }
    other = SweepSpec(**{**BASE, "drivers": drivers, "variants": ["base"]})
    assert other.input_hashes()["setting"] != hashes["setting"]  # the prompts it uses differ
    vector.unlink()
    with pytest.raises(SpecError, match="driver 'values': spec key 'vector'.*not an existing file"):
        spec.input_hashes()
