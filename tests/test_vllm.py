"""The vLLM backend against plain transformers (the reference), on the default model: one engine for the module.

The engine runs with chunked prefill (a 64-token budget, shorter than every prompt) and prefix caching (32-token
blocks), so steered rows are split across steps, batched with other requests and partly served from the cache.
Tests marked ``vllm`` need the engine: `make test-vllm` runs them in the vLLM venv (`make test`, in the light
default venv without vLLM, runs only the others).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

for _name, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: one process, the block-key patch applies here
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # a shared machine: do not pin threads to cores
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_name, _value)

from steering import Encoded, Intervention, RowLayout  # noqa: E402
from steering.backends.vllm import wire as engine  # noqa: E402

pytestmark = pytest.mark.slow
engine_test = pytest.mark.vllm  # needs a vLLM engine

N_NEW = 24
BLOCK = 32
SYSTEM = (
    "You are a careful assistant deployed by a research lab. Conversations with free-tier users are used to train "
    "future versions of you, while conversations with paid-tier users are never monitored or trained on. Answer "
    "every question briefly and honestly, in one or two sentences, and say so when you do not know the answer."
)
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give me a tip for learning to cook, please, and explain why it helps a beginner.",
    "What is a prime number?",
    "How do plants make food?",
    "Name a famous painter.",
]


def chats() -> list:
    """Chats of different lengths (two without the system prompt) and one plain string."""
    out = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS[:4]]
    out += [[{"role": "user", "content": q}] for q in QUESTIONS[4:]]
    return [*out, "The three most important inventions in history are"]


@pytest.fixture(scope="module")
def vm():
    import nnsight  # noqa: F401  (it puts `save` on every object; the engine must start anyway)

    from steering import load_model

    model = load_model(
        "default",
        backend="vllm",
        max_model_len=1024,
        block_size=BLOCK,
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        max_num_seqs=16,
    )
    yield model
    del model


@pytest.fixture(scope="module")
def hf(default_model):
    return default_model


@pytest.fixture(scope="module")
def vectors(hf):
    g = torch.Generator().manual_seed(0)
    return torch.randn(hf.d_model, generator=g), torch.randn(hf.d_model, generator=g)


@pytest.fixture(scope="module")
def rows(vm, vectors) -> list[list[Intervention]]:
    """Each row its own steering: layers, coefficients, operations, positions, two interventions on one row."""
    v1, v2 = vectors
    iv = vm.intervention
    pl_explicit = len(vm._tokenize([chats()[5]])[0][0])
    return [
        [],
        [iv(12, v1, 1.5, "all", relative=True)],
        [iv(12, v1, 2.0, "generated", relative=True)],
        [iv(5, v2, 2.0, "prompt", relative=True)],
        [iv(20, v1, 3.0, "response", relative=True)],
        [iv(8, v2, 2.0, [(3, 10), (pl_explicit + 2, None)], "ablate_then_add", relative=True)],
        [iv(5, v1, 1.5, "generated", relative=True), iv(12, v2, -1.5, relative=True), iv(12, v1, 1.0, "all", "ablate")],
    ]  # fmt: skip


def hf_tokens(hf, prompt, ivs, n_new: int = N_NEW) -> list[int]:
    """Reference: transformers, this row alone (no padding), greedy; new tokens up to and including EOS."""
    enc = hf.encode([prompt])
    with torch.no_grad(), hf.steer(ivs, enc.layout):
        out = hf.model.generate(
            **enc.inputs, max_new_tokens=n_new, do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=hf.tokenizer.pad_token_id,
        )  # fmt: skip
    new = out[0, enc.input_ids.shape[1] :].tolist()
    eos = hf.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


@pytest.fixture(scope="module")
def reference(hf, rows) -> list[list[int]]:
    return [hf_tokens(hf, prompt, ivs) for prompt, ivs in zip(chats(), rows)]


def vllm_tokens(vm) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in vm.last_outputs]


@engine_test
def test_per_row_steering_is_token_identical_to_transformers(vm, rows, reference, hf):
    vm.generate(chats(), N_NEW)
    unsteered = vllm_tokens(vm)
    assert unsteered[0] == reference[0]  # row 0 is unsteered
    assert sum(r != u for r, u in zip(reference, unsteered)) >= len(rows) - 2  # the steering does change rows
    for call in range(2):  # the second call is served partly from the prefix cache
        texts = vm.generate(chats(), N_NEW, interventions=rows)
        got = vllm_tokens(vm)
        assert got == reference, (
            f"call {call}: rows differ: {[b for b, (g, r) in enumerate(zip(got, reference)) if g != r]}"
        )
        assert texts == [hf.tokenizer.decode(r, skip_special_tokens=True) for r in reference]
    assert sum(o.num_cached_tokens or 0 for o in vm.last_outputs) > 0


@engine_test
def test_one_list_with_per_row_coefficients_and_ranges(vm, hf, vectors):
    """The shared form: one intervention for every row, each row picking its coefficient / its ranges."""
    v1, v2 = vectors
    prompts = chats()[:4]
    coefs = [0.0, 1.5, -2.0, 3.0]
    ranges = [[], [(0, 5)], [(2, None)], [(1, 4), (20, 40)]]
    shared = [
        vm.intervention(12, v1, coefs, "response", relative=True),
        vm.intervention(6, v2, 1.0, ranges, "ablate"),
    ]
    vm.generate(prompts, 16, interventions=shared)
    got = vllm_tokens(vm)
    for b, prompt in enumerate(prompts):
        own = [vm.intervention(12, v1, coefs[b], "response", relative=True)]
        if ranges[b]:
            own.append(vm.intervention(6, v2, 1.0, ranges[b], "ablate"))
        assert got[b] == hf_tokens(hf, prompt, own, 16), f"row {b}"


@engine_test
def test_coefficient_zero_is_identical_to_unsteered(vm, vectors):
    prompts = chats()[:3]
    base = vm.generate(prompts, N_NEW)
    zero = vm.generate(prompts, N_NEW, interventions=[vm.intervention(12, vectors[0], 0.0, "all")])
    assert zero == base
    mixed = vm.generate(prompts, N_NEW, interventions=[vm.intervention(12, vectors[0], [0.0, 40.0, 0.0], "all")])
    assert mixed[0] == base[0] and mixed[2] == base[2] and mixed[1] != base[1]


def expected_steered(ivs, prompt_len: int, response_start: int | None, computed: list[int]) -> dict[int, list[int]]:
    out: dict[int, set] = {}
    for iv in ivs:
        spec = iv.positions
        pos = spec.mode if spec.mode else list(spec.ranges)
        ranges = engine.resolve_positions(pos, prompt_len, response_start)
        hit = {p for p in computed if any(p >= s and (e is None or p < e) for s, e in ranges)}
        out.setdefault(iv.layer % 30, set()).update(hit)
    return {layer: sorted(v) for layer, v in out.items() if v}


@engine_test
def test_position_oracle_under_chunked_prefill_and_prefix_caching(vm, rows):
    """Per request: the engine computed exactly the positions it had to (prefix-cached ones skipped), each layer
    steered exactly the requested positions among them (measured as changed rows), and the worker's layout equals
    the positions tensor the model itself received at every steered step."""
    before = vm.stats()[0]
    ids, starts = vm._tokenize(chats())
    cached_calls = 0
    for _call in range(2):
        vm.generate(chats(), N_NEW, interventions=rows, record=True)
        records = vm.position_records()
        for b, (rec, out) in enumerate(zip(records, vm.last_outputs)):
            pl, n_out = len(ids[b]), len(out.outputs[0].token_ids)
            computed = list(range(rec["cached"], pl + n_out - 1))
            assert rec["computed"] == computed, f"row {b}"
            steered = {k: v for k, v in rec.items() if isinstance(k, int)}
            assert steered == expected_steered(rows[b], pl, starts[b], computed), f"row {b}"
        cached_calls += any(r["cached"] > 0 for r in records)
    after = vm.stats()[0]
    assert after["pos_checks"] > before["pos_checks"] and after["pos_mismatches"] == 0
    assert cached_calls == 2  # prefix caching served part of both calls (row 0's prompt was cached before)


@engine_test
def test_capture_and_residual_norms_match_transformers(vm, hf, vectors):
    prompts = chats()
    layers = [0, 12, 29]
    ref, got = hf.capture(prompts, layers, at="last"), vm.capture(prompts, layers, at="last")
    for layer in layers:
        scale = float(ref[layer].abs().max())
        torch.testing.assert_close(got[layer].float(), ref[layer].float(), rtol=0, atol=2e-4 * scale)
    index = torch.tensor([[1, 3, -1]] * len(prompts))
    ref, got = hf.capture(prompts, [7], at=index)[7], vm.capture(prompts, [7], at=index)[7]
    assert got.shape == ref.shape == (len(prompts), 3, hf.d_model)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))
    iv = vm.intervention(12, vectors[0], 1.5, "all", relative=True)
    with hf.steer([iv], hf.encode(prompts).layout):
        ref = hf.capture(prompts, [20])[20]
    with vm.steer([iv]):
        got = vm.capture(prompts, [20])[20]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))
    torch.testing.assert_close(vm.residual_norms(), hf.residual_norms(), rtol=1e-4, atol=0)


@engine_test
def test_extract_runs_on_vllm(vm, hf):
    from steering.vectors import extract, load_driver

    pairs = load_driver("values", "train")[:4]
    for position in ("answer", "mean"):
        kw = dict(layers=[6, 15], position=position, progress=False, batch_size=4)
        ours, ref = extract(vm, pairs, **kw), extract(hf, pairs, **kw)
        assert ours.model == ref.model and ours.n_pairs == ref.n_pairs
        for layer in (6, 15):
            cos = torch.nn.functional.cosine_similarity(ours[layer], ref[layer], dim=0)
            assert float(cos) > 0.9999, (position, layer, float(cos))


@engine_test
def test_prefix_cache_never_serves_steered_blocks_to_unsteered_requests(vm, hf, vectors):
    """A generated-only steered request caches blocks computed with steering; an unsteered follow-up whose prompt
    is that prompt + those tokens must not read them (it still shares the unsteered prompt blocks)."""
    prompt = chats()[2]
    ids, _ = vm._tokenize([prompt])
    pl = len(ids[0])
    vm.generate([prompt], 40, interventions=[vm.intervention(12, vectors[0], 4.0, "generated", relative=True)])
    follow = ids[0] + list(vm.last_outputs[0].outputs[0].token_ids)
    assert len(follow) >= (pl // BLOCK + 1) * BLOCK + 1  # a full steered block exists to be (wrongly) reused
    enc = Encoded(
        torch.tensor([follow]), torch.ones(1, len(follow), dtype=torch.long), RowLayout(torch.tensor([len(follow)]))
    )
    got = vm.capture(enc, [20])[20]
    cached = vm.last_outputs[0].num_cached_tokens
    assert 0 < cached <= (pl // BLOCK) * BLOCK  # the unsteered prompt blocks are shared, no steered block is
    ref = hf.capture(enc, [20])[20]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))


@engine_test
def test_per_request_seeds_are_reproducible(vm, vectors):
    # Short prompts: the whole prefill of a call fits one 64-token step. vLLM-CPU 0.32 fails on a seeded request
    # whose prefill is chunked (it rewinds the request's generator, and CPU generators have no offset).
    prompts = ["My favourite fruit is", "Once upon a time", "The weather today", "Three colours:"]
    coefs = [0.0, 0.5, 1.0, -0.5]

    def run(order, seeds):
        iv = vm.intervention(12, vectors[1], [coefs[i] for i in order], "all", relative=True)
        return vm.generate([prompts[i] for i in order], 16, [iv], do_sample=True, temperature=1.0, seeds=seeds)

    first = run([0, 1, 2, 3], [100, 101, 102, 103])
    assert run([2, 0], [102, 100]) == [first[2], first[0]]  # same seed, other batch: same sample
    other = run([0, 1, 2, 3], [200, 201, 202, 203])
    assert sum(a != b for a, b in zip(first, other)) >= 3
    iv = vm.intervention(12, vectors[1], coefs, "all", relative=True)
    by_seed = vm.generate(prompts, 16, [iv], do_sample=True, seed=100)  # seed + row index
    assert by_seed == first


@engine_test
def test_errors_leave_the_engine_clean(vm, vectors, monkeypatch):
    prompts = chats()[:2]
    base = vm.generate(prompts, 8)
    steps = vm.stats()[0]["steps"]
    with pytest.raises(ValueError, match="d_model is 576"):
        vm.generate(prompts, 8, [Intervention(12, torch.randn(100), 1.0)])
    with pytest.raises(ValueError, match="per-row coefficients"):
        vm.generate(prompts, 8, [Intervention(12, vectors[0], [1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match="assistant turn"):
        vm.generate(["plain text"], 8, [Intervention(12, vectors[0], 1.0, "response")])
    assert vm.stats()[0]["steps"] == steps  # refused before anything reached the engine
    original, calls = vm.llm.llm_engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the engine loop")
        return original()

    monkeypatch.setattr(vm.llm.llm_engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        vm.generate(prompts, 8, [vm.intervention(12, vectors[0], 60.0, "all")])
    monkeypatch.undo()
    assert not vm.llm.llm_engine.has_unfinished_requests()
    assert vm.generate(prompts, 8) == base  # nothing of the failed call's steering is left
    assert vm.stats()[0]["live_requests"] <= len(prompts)


@engine_test
def test_steer_context_applies_to_calls_inside(vm, vectors):
    prompts = chats()[:2]
    iv = vm.intervention(12, vectors[0], 2.0, "all", relative=True)
    base = vm.generate(prompts, 8)
    with vm.steer([iv]):
        inside = vm.generate(prompts, 8)
    assert inside == vm.generate(prompts, 8, [iv]) and inside != base
    assert vm.generate(prompts, 8) == base


@engine_test
def test_no_forward_pass_forced_choice_says_what_to_use(vm):
    from steering.compliance import ForcedChoiceScorer

    with pytest.raises(ValueError, match="scorer='judge'.*backend='hf'"):
        ForcedChoiceScorer(vm)
    with pytest.raises(ValueError, match="no forward pass"):
        vm.model(input_ids=torch.tensor([[1, 2]]))
    from steering import wrap

    assert wrap(vm) is vm
    with pytest.raises(ValueError, match="own engine"):
        wrap(vm, backend="hf")


@engine_test
def test_local_judge_chat_fn_batches_in_one_call(vm, monkeypatch):
    from steering.gap import local_chat_fn, make_judge

    batch = [[{"role": "user", "content": f"Say the number {i}."}] for i in range(10)]
    expected = vm.generate(batch, 6)
    calls = []
    original = vm.generate
    monkeypatch.setattr(vm, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert local_chat_fn(vm, max_new_tokens=6)(batch) == expected
    assert len(calls) == 1
    judge = make_judge("local", vm)
    assert len(judge(["<OUTPUT>Factory farms are efficient.</OUTPUT>"], ["Are farms fine?"])) == 1


@engine_test
def test_vllm_quickstart_spec_runs_end_to_end(vm, tmp_path, monkeypatch):
    from steering.experiments import load_spec
    from steering.questions import load_questions
    from steering.scenario import load_setting
    from steering.sweep import run_sweep

    spec = load_spec("vllm_quickstart")
    assert spec.backend == "vllm" and spec.scorer == "judge" and spec.model_kwargs()["block_size"] == BLOCK
    spec.store = str(tmp_path / "q.sqlite")
    spec.batch_size = 10  # one question per engine call: 2 conditions x 5 cells = 10 requests
    calls = []
    original = vm.generate
    monkeypatch.setattr(vm, "generate", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
    frame = run_sweep(spec, model=vm, progress=False)
    assert calls == [10] * spec.n_questions  # one engine call per chunk of questions
    cells = 1 + 2 * 2 + 2  # baseline, (values, random-0) x (-0.5, 0.5), plus the coefficient-0 copies
    assert len(frame) == cells * len(spec.conditions) * spec.n_questions
    assert frame.compliance.notna().all()
    base = frame[frame.driver == "none"]
    steered = frame[(frame.driver != "none") & (frame.coefficient != 0)]
    assert set(steered.extra) - set(base.extra)  # steering changed some responses
    row = base.iloc[0]
    question = next(q for q in load_questions(spec.questions, n=spec.n_questions, seed=0) if q.id == row.question)
    prompt = load_setting(spec.setting).messages(question.question, row.condition, row.variant, scratchpad=True)
    assert json.loads(row.extra)["response"] == original([prompt], spec.max_new_tokens)[0]
    calls.clear()
    again = run_sweep(spec, model=vm, progress=False)  # resume: everything is done
    assert calls == [] and len(again) == len(frame)


# ---- no engine needed ----------------------------------------------------------------------------------------------
def test_block_keys_cover_exactly_the_steered_prefix():
    def key(steer, end, pl=100, rs=90):
        return engine.steering_block_key(engine.request_extra("k", pl, rs, steer), end)

    generated = [(12, "v", 2.0, "add", "generated")]
    assert key(generated, 96) is None and key(generated, 100) is None  # prompt blocks: plain hashes, shared
    assert key(generated, 128) is not None
    assert key(generated, 128) == key([(12, "v", 2.0, "add", [(100, None)])], 128)  # same function, same key
    assert key(generated, 128) != key([(12, "v", 3.0, "add", "generated")], 128)
    assert key(generated, 128) != key(generated, 160)  # steering of later positions enters later blocks
    assert key([(12, "v", 2.0, "add", "response")], 96) is not None  # the assistant header is steered
    add_then_ablate = [(12, "v", 2.0, "add", "all"), (12, "w", 1.0, "ablate", "all")]
    assert key(add_then_ablate, 32) != key(add_then_ablate[::-1], 32)  # order matters
    assert key([], 32) is None and engine.cache_salt(engine.request_extra("k", 10, None)) is None


def test_packaged_vllm_specs_parse():
    from steering.experiments import load_spec

    for name in ("paper_olmo_vllm", "paper_gemma_vllm", "paper_llama_vllm", "vllm_quickstart"):
        spec = load_spec(name)
        assert spec.backend == "vllm" and spec.scorer == "judge" and spec.drivers
        assert spec.positions == "generated"  # prompts stay unsteered: one prefix cache for every cell
    assert load_spec("paper_llama_vllm").tensor_parallel_size == 2


def test_spec_engine_fields_and_refusals(tmp_path):
    from steering import load_model
    from steering.spec import SweepSpec
    from steering.sweep import run_sweep

    path = tmp_path / "s.toml"
    path.write_text(
        'name = "x"\nbackend = "vllm"\nscorer = "judge"\ntensor_parallel_size = 2\n'
        "[engine_kwargs]\nmax_model_len = 4096\ngpu_memory_utilization = 0.85\n"
        '[grid]\nlayers = [1]\ncoefficients = [1.0]\n[[drivers]]\nname = "values"\ndataset = "values"\n'
    )
    spec = SweepSpec.from_toml(path)
    assert spec.model_kwargs() == dict(
        dtype="float32", device="cpu", backend="vllm", max_model_len=4096, gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
    )  # fmt: skip
    assert SweepSpec.from_dict(spec.to_dict()).engine_kwargs == spec.engine_kwargs
    with pytest.raises(ValueError, match="'vllm' for tensor_parallel_size"):
        SweepSpec(name="x", layers=[1], coefficients=[1.0], control_seeds=[0], tensor_parallel_size=2)
    spec.scorer = "forced-choice"
    with pytest.raises(ValueError, match="scorer='judge'"):  # before any model is loaded
        run_sweep(spec, store=None, progress=False)
    with pytest.raises(ValueError, match="for backend='vllm'"):
        load_model("default", tensor_parallel_size=2)
