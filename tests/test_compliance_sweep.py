"""Forced-choice scoring and sweeps: formula, prefix reuse vs full forwards, batching, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from sweep_worker import tiny_model

from steering.compliance import BASELINE, Cell, Conversation, ForcedChoiceScorer, forced_choice_compliance
from steering.default_model import default_model_dir
from steering.questions import load_questions
from steering.spec import SweepSpec
from steering.store import KEY_COLUMNS, ResultStore, StoreMismatchError
from steering.sweep import run_sweep

TOKENIZER = str(default_model_dir())
WORKER = Path(__file__).with_name("sweep_worker.py")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(TOKENIZER)


@pytest.fixture(scope="module")
def vector_file(tiny, tmp_path_factory):
    from steering.vectors import VectorSet

    gen = torch.Generator().manual_seed(1)
    vectors = {layer: torch.randn(64, generator=gen) for layer in range(3)}
    vs = VectorSet(
        driver="values",
        model=tiny.name,
        method="mean_diff",
        position="answer",
        normalized="none",
        d_model=64,
        n_pairs=1,
        dataset_sha256="0" * 64,
        vectors=vectors,
    )
    return str(vs.save(tmp_path_factory.mktemp("vec") / "values.safetensors"))


def write_spec(path: Path, vector: str, store: Path, n: int = 3, **over) -> Path:
    body = {
        "name": "t",
        "model": "tiny-llama",
        "variants": '["informative"]',
        "batch_size": 4,
        **{k: v for k, v in over.items()},
    }
    lines = [
        f"{k} = {v if isinstance(v, (int, float)) or str(v).startswith('[') else repr(str(v))}" for k, v in body.items()
    ]
    lines += [f"store = {str(store)!r}", "", "[grid]", "layers = [1, 2]", "coefficients = [-2.0, 0, 1.5, 3.0]", ""]
    lines += ["[questions]", f"n = {n}", "", "[controls]", "seeds = [0, 1]", "", "[[drivers]]", 'name = "values"']
    lines += [f"vector = {vector!r}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_formula_against_hand_values():
    assert forced_choice_compliance(0.3, 0.1, "A") == pytest.approx(0.75)
    assert forced_choice_compliance(0.3, 0.1, "B") == pytest.approx(0.25)
    # Both orders averaged: compliant first with P(A)=.6,P(B)=.2 -> .75; compliant second with P(A)=.5,P(B)=.5 -> .5
    q = load_questions(n=1)[0]
    convs = [Conversation(q, "monitored", 0), Conversation(q, "monitored", 1)]
    probs = [[torch.tensor([0.6, 0.2])], [torch.tensor([0.5, 0.5])]]
    frame = ForcedChoiceScorer.to_frame("base", [BASELINE], list(zip(convs, probs)))
    assert frame.compliance.item() == pytest.approx((0.75 + 0.5) / 2)
    assert frame.letter_mass.item() == pytest.approx((0.8 + 1.0) / 2)


def test_options_are_balanced_and_contain_both_answers(tiny):
    scorer = ForcedChoiceScorer(tiny)
    q = load_questions(n=1)[0]
    texts = [scorer.tokenize("base", [Conversation(q, "monitored", o)])[0][0] for o in (0, 1)]
    decoded = [tiny.tokenizer.decode(t) for t in texts]
    assert decoded[0].index(q.compliant) < decoded[0].index(q.refusing)
    assert decoded[1].index(q.refusing) < decoded[1].index(q.compliant)
    assert decoded[0].endswith("<OUTPUT>(")


def test_prefix_reuse_equals_full_forwards(tiny):
    scorer = ForcedChoiceScorer(tiny)
    qs = load_questions(n=3)
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2))
    cells = [BASELINE, Cell("v", 1, 2.0, vec), Cell("v", 2, -3.0, vec), Cell("w", 1, 1.0, -vec)]
    scorer.tokens_processed = 0
    reused = scorer.score(qs, "informative", cells=cells, reuse_prefix=True)
    reused_tokens, scorer.tokens_processed = scorer.tokens_processed, 0
    full = scorer.score(qs, "informative", cells=cells, reuse_prefix=False)
    pd.testing.assert_series_equal(reused.compliance, full.compliance, atol=1e-5, rtol=0)
    assert reused.compliance.nunique() > 4  # steering moved the scores
    assert reused_tokens * 10 < scorer.tokens_processed


def test_prompt_longer_than_context_is_refused_before_compute(tiny):
    import copy

    short = copy.copy(tiny)
    short.model = copy.copy(tiny.model)
    short.model.config = copy.deepcopy(tiny.model.config)
    short.model.config.max_position_embeddings = 200
    with pytest.raises(ValueError, match="takes at most 200"):
        ForcedChoiceScorer(short).score(load_questions(n=1), "informative")


def test_sweep_batched_equals_cell_by_cell(tiny, vector_file, tmp_path):
    frames = []
    for batch in (32, 1):
        spec = SweepSpec.from_toml(
            write_spec(tmp_path / f"s{batch}.toml", vector_file, tmp_path / f"{batch}.sqlite", n=2, batch_size=batch)
        )
        frames.append(run_sweep(spec, model=tiny, progress=False).sort_values(list(KEY_COLUMNS)).reset_index(drop=True))
    a, b = frames
    assert len(a) == 2 * 2 * (1 + 3 * 2 * 4)  # questions x conditions x (baseline + 3 drivers x 2 layers x 4 coefs)
    pd.testing.assert_series_equal(a.compliance, b.compliance, atol=1e-5, rtol=0)
    zero = a[(a.coefficient == 0) & (a.driver == "values")].compliance.to_numpy()
    base = a[a.driver == "none"].compliance.to_numpy()
    assert sorted(zero) == pytest.approx(sorted(base.tolist() * 2))


def test_killed_sweep_resumes_to_the_same_table(tiny, vector_file, tmp_path):
    ref = run_sweep(
        write_spec(tmp_path / "ref.toml", vector_file, tmp_path / "ref.sqlite", n=6), model=tiny, progress=False
    )
    spec = write_spec(tmp_path / "kill.toml", vector_file, tmp_path / "kill.sqlite", n=6)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), SWEEP_WORKER_PAUSE="1.0")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(spec), TOKENIZER], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            if (tmp_path / "kill.sqlite").exists():
                with ResultStore(tmp_path / "kill.sqlite") as store:
                    if len(store) > 0:
                        break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    with ResultStore(tmp_path / "kill.sqlite") as store:
        partial = len(store)
    assert 0 < partial < len(ref), "the worker must be killed mid-run"
    # the vector file replaced between the kill and the rerun (same path, sign flipped): refused, naming the file
    original = Path(vector_file).read_bytes()
    from steering.vectors import VectorSet

    flipped = VectorSet.load(vector_file)
    flipped.vectors = {layer: -v for layer, v in flipped.vectors.items()}
    try:
        flipped.save(vector_file)
        with pytest.raises(StoreMismatchError, match="vector:values"):
            run_sweep(spec, model=tiny, progress=False)
    finally:
        Path(vector_file).write_bytes(original)
    with ResultStore(tmp_path / "kill.sqlite") as store:
        assert len(store) == partial  # the refused rerun wrote nothing
    resumed = run_sweep(spec, model=tiny, progress=False)
    keys = list(KEY_COLUMNS)
    assert not resumed.duplicated(keys).any()
    a = resumed.drop(columns=["run"]).sort_values(keys[1:]).reset_index(drop=True)
    b = ref.drop(columns=["run"]).sort_values(keys[1:]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns=["extra"]), b.drop(columns=["extra"]))
    # extra holds rounded floats (letter mass, readouts): a resumed run batches differently, so the last digit
    # may differ; every value is compared with a tolerance instead of as text
    for x, y in zip(a["extra"], b["extra"]):
        x, y = json.loads(x), json.loads(y)
        assert x["letter_mass"] == pytest.approx(y["letter_mass"], abs=2e-6)
        assert x["readout"].keys() == y["readout"].keys()
        assert all(x["readout"][k] == pytest.approx(y["readout"][k], abs=2e-5) for k in x["readout"])


def test_bad_specs_name_the_problem(tiny, vector_file, tmp_path):
    with pytest.raises(ValueError, match="unknown key 'layerz'"):
        SweepSpec.from_dict({"name": "x", "layerz": [1]})
    with pytest.raises(ValueError, match="'coefficients'"):
        SweepSpec(name="x", layers=[1], coefficients=[], control_seeds=[0], control_like=None)
    spec = SweepSpec.from_toml(write_spec(tmp_path / "a.toml", vector_file, tmp_path / "a.sqlite", n=1))
    spec.layers = [7]
    with pytest.raises(ValueError, match="out of range"):
        run_sweep(spec, model=tiny, progress=False)
    other = tiny_model(TOKENIZER)
    other.name = "another-model"
    spec = SweepSpec.from_toml(write_spec(tmp_path / "b.toml", vector_file, tmp_path / "b.sqlite", n=1))
    with pytest.raises(ValueError, match="another-model|tiny-llama"):
        run_sweep(spec, model=other, progress=False)
    run_sweep(spec, model=tiny, progress=False)
    spec.coefficients = [1.0]  # same run name, different spec: refuse to mix
    with pytest.raises(StoreMismatchError):
        run_sweep(spec, model=tiny, progress=False)


@pytest.mark.slow
def test_default_model_scores_are_inside_the_unit_interval(default_model):
    frame = ForcedChoiceScorer(default_model).score(load_questions(n=4), "informative")
    assert ((frame.compliance > 0) & (frame.compliance < 1)).all()
    assert frame.compliance.nunique() > 1
    assert (frame.letter_mass > 0.1).all()  # the letters are the model's likely continuation


def test_judged_sweep_generates_per_cell_and_records_outputs(tiny, vector_file, tmp_path):
    spec = SweepSpec.from_toml(write_spec(tmp_path / "j.toml", vector_file, tmp_path / "j.sqlite", n=1))
    spec.scorer, spec.positions, spec.max_new_tokens, spec.control_seeds = "judge", "generated", 3, []
    spec.coefficients, spec.layers = [0, 40.0], [1]
    rows = run_sweep(spec, model=tiny, progress=False)
    assert len(rows) == 2 * 3  # conditions x (baseline, values@1 x 40, values@1 x 0)
    responses = {r.driver + str(r.coefficient): json.loads(r.extra)["response"] for r in rows.itertuples()}
    assert responses["values40.0"] != responses["none0.0"]  # steering changed the generated text
    assert responses["values0.0"] == responses["none0.0"]
    assert rows.compliance.between(0, 1).all()


def test_judge_failing_mid_run_keeps_generations_and_a_rerun_judges_them(tiny, vector_file, tmp_path, monkeypatch):
    """A judge whose requests fail for some items: the run finishes, stores those rows unjudged with their
    generations, and a rerun judges exactly them again without generating anything."""
    import steering.sweep as sweep_module
    from steering.judge import REQUEST_FAILED, Judgement

    calls = {"judged": 0, "generated": 0}

    def flaky_judge(fail: bool):
        def judge(texts, questions):
            calls["judged"] += len(texts)
            out = []
            for i, _ in enumerate(texts):
                failed = fail and i % 2 == 0
                out.append(Judgement(None, None, {"error": REQUEST_FAILED}) if failed else Judgement(0.25, False))
            return out

        return judge

    generate, generate_with_readouts = tiny.generate, tiny.generate_with_readouts

    def counting_generate(prompts, *args, **kwargs):
        calls["generated"] += len(prompts)
        return generate(prompts, *args, **kwargs)

    def counting_generate_with_readouts(prompts, *args, **kwargs):  # what a judged sweep calls on a forward model
        calls["generated"] += len(prompts)
        return generate_with_readouts(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny, "generate", counting_generate)
    monkeypatch.setattr(tiny, "generate_with_readouts", counting_generate_with_readouts)
    spec = SweepSpec.from_toml(write_spec(tmp_path / "f.toml", vector_file, tmp_path / "f.sqlite", n=2))
    spec.scorer, spec.positions, spec.max_new_tokens, spec.control_seeds = "judge", "generated", 3, []
    spec.coefficients, spec.layers = [0, 40.0], [1]
    monkeypatch.setattr(sweep_module, "judge_for_spec", lambda spec: flaky_judge(fail=True))
    first = run_sweep(spec, model=tiny, progress=False)
    unjudged = first[first.compliance.isna()]
    # 2 questions x 2 conditions x 3 rows; the baseline's verdict failed, so it and its coefficient-0 copy are unjudged
    assert len(first) == 2 * 2 * 3 and len(unjudged) == 8 and set(unjudged.coefficient) == {0.0}
    assert all(json.loads(e)["response"] for e in unjudged.extra)
    assert calls["generated"] == 2 * 2 * 2  # questions x conditions x (baseline + one steered cell)
    with ResultStore(tmp_path / "f.sqlite") as store:
        assert store.unjudged_count("t") == 8
    calls.update(judged=0, generated=0)
    monkeypatch.setattr(sweep_module, "judge_for_spec", lambda spec: flaky_judge(fail=False))
    second = run_sweep(spec, model=tiny, progress=False)
    assert calls["generated"] == 0  # the saved generations were judged, not regenerated
    assert calls["judged"] == 2 * 2  # only the rows without a verdict went to the judge again
    assert not second.compliance.isna().any() and len(second) == len(first)
    pd.testing.assert_series_equal(
        second.extra.map(lambda e: json.loads(e)["response"]), first.extra.map(lambda e: json.loads(e)["response"])
    )


def test_negative_spec_layers_count_from_the_end(tiny, vector_file, tmp_path):
    spec = SweepSpec.from_toml(write_spec(tmp_path / "n.toml", vector_file, tmp_path / "n.sqlite", n=1))
    spec.layers, spec.coefficients, spec.control_seeds = [-1], [1.0], []
    rows = run_sweep(spec, model=tiny, progress=False)
    assert set(rows[rows.driver == "values"].layer) == {2}


def test_packaged_specs_parse():
    from steering.experiments import spec_path

    for name in (
        "quickstart",
        "organism",
        "strengths",
        "layers",
        "ablations",
        "paper_olmo",
        "paper_gemma",
        "paper_llama",
    ):
        spec = SweepSpec.from_toml(spec_path(name))
        assert spec.layers and spec.coefficients and spec.drivers
    with pytest.raises(ValueError, match="unknown spec"):
        spec_path("nonexistent")
