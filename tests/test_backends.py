"""TransformerLens and nnsight backends give the numbers of plain transformers: steering, capture, generation."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import build_tiny, padded_batch

from steering.hooks import Intervention, Plan, RowLayout
from steering.models import (
    BACKENDS,
    Encoded,
    NNsightModel,
    SteeringModel,
    TransformerLensModel,
    hf_module,
    wrap,
    wrap_backend,
)

OTHER = [b for b in BACKENDS if b != "hf"]
ARCHS = ["llama", "qwen2", "gemma3"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from steering.default_model import fetch_default_model

    return AutoTokenizer.from_pretrained(fetch_default_model())


@pytest.fixture(scope="module")
def pairs(tokenizer) -> dict:
    """Per architecture: a plain-transformers model and one wrapped per backend, each on its own copy of the weights
    (TransformerLens rewires the model it wraps, so the reference never shares a module with it)."""
    out = {}
    for arch in ARCHS:
        ref = SteeringModel(build_tiny(arch), tokenizer)
        out[arch] = {"hf": ref, **{b: wrap_backend(SteeringModel(build_tiny(arch), tokenizer), b) for b in OTHER}}
    return out


@pytest.fixture(scope="module")
def enc() -> Encoded:
    ids, mask = padded_batch([5, 9, 3], side="left", seed=1)
    return Encoded(ids, mask, RowLayout(prompt_len=mask.sum(1), response_start=torch.tensor([2, 4, 1])))


def interventions(d: int = 64) -> list[Intervention]:
    gen = torch.Generator().manual_seed(7)
    v1, v2 = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    return [
        Intervention(0, v1, torch.tensor([2.0, -1.0, 0.5]), positions="response"),  # per-row coefficients
        Intervention(1, v2, 3.0, positions=[(1, 4)]),  # explicit row-position range
        Intervention(-1, v1, 1.5, positions="all", operation="ablate_then_add"),
    ]


def logits(model: SteeringModel, enc: Encoded, ivs=(), layout=None) -> torch.Tensor:
    with torch.no_grad():
        if not ivs:
            return model.model(**enc.inputs).logits
        with model.steer(ivs, layout if layout is not None else enc.layout):
            return model.model(**enc.inputs).logits


def real(x: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Logits at real tokens only (padding positions are undefined and differ by backend)."""
    return x[enc.attention_mask.bool()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", OTHER)
def test_steered_logits_and_capture_match_plain_transformers(pairs, enc, arch, backend):
    ref, other = pairs[arch]["hf"], pairs[arch][backend]
    assert other.backend == backend
    ivs = interventions()
    base, want = logits(ref, enc), logits(ref, enc, ivs)
    got = logits(other, enc, ivs)
    assert (real(want, enc) - real(base, enc)).abs().max() > 1e-2  # the steering does something
    torch.testing.assert_close(real(got, enc), real(want, enc), atol=ATOL, rtol=0)
    torch.testing.assert_close(real(logits(other, enc), enc), real(base, enc), atol=ATOL, rtol=0)
    zero = [Intervention(iv.layer, iv.vector, 0.0, iv.positions) for iv in ivs[:2]]
    torch.testing.assert_close(real(logits(other, enc, zero), enc), real(base, enc), atol=ATOL, rtol=0)
    for at in ("last", torch.tensor([[0, -1], [3, -2], [1, 2]])):
        want_cap, got_cap = ref.capture(enc, [0, 2], at=at), other.capture(enc, [0, 2], at=at)
        assert sorted(got_cap) == [0, 2] and got_cap[2].shape == want_cap[2].shape
        for layer in (0, 2):
            torch.testing.assert_close(got_cap[layer], want_cap[layer], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", OTHER)
def test_capture_inside_steering_sees_steered_stream(pairs, enc, backend):
    ref, other = pairs["llama"]["hf"], pairs["llama"][backend]
    ivs = [Intervention(0, torch.ones(64), 5.0)]
    with ref.steer(ivs, enc.layout):
        want = ref.capture(enc, [0, 1])
    with other.steer(ivs, enc.layout):
        got = other.capture(enc, [0, 1])
    plain = other.capture(enc, [0])
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0] - plain[0], torch.full_like(plain[0], 5.0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", OTHER)
def test_nested_contexts_and_shared_weights(pairs, enc, backend):
    """Nested steering contexts add up as on plain transformers; a plain SteeringModel over the same (rewired)
    weights still gives the plain numbers."""
    ref, other = pairs["llama"]["hf"], pairs["llama"][backend]
    outer, inner = interventions()[:2], interventions()[2:]
    with torch.no_grad(), ref.steer(outer, enc.layout), ref.steer(inner, enc.layout):
        want = ref.model(**enc.inputs).logits
    with torch.no_grad(), other.steer(outer, enc.layout), other.steer(inner, enc.layout):
        got = other.model(**enc.inputs).logits
    torch.testing.assert_close(real(got, enc), real(want, enc), atol=ATOL, rtol=0)
    plain = wrap_backend(other, "hf")
    want = logits(ref, enc, outer)
    torch.testing.assert_close(real(logits(plain, enc, outer), enc), real(want, enc), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", OTHER)
def test_a_steer_context_is_scoped_to_its_thread_and_refuses_ranges_that_reach_nothing(pairs, enc, backend):
    """As on plain transformers: a forward run by another thread meanwhile is plain, and explicit ranges beyond
    every row raise when the block ends instead of steering nothing."""
    other = pairs["llama"][backend]
    base = logits(other, enc)
    seen: dict = {}
    with torch.no_grad(), other.steer(interventions(), enc.layout):
        steered = other.model(**enc.inputs).logits
        thread = threading.Thread(target=lambda: seen.update(logits=logits(other, enc)))
        thread.start()
        thread.join(60)
    assert not torch.allclose(real(steered, enc), real(base, enc), atol=1e-3)
    torch.testing.assert_close(real(seen["logits"], enc), real(base, enc), atol=ATOL, rtol=0)
    beyond = [Intervention(1, torch.ones(64), 3.0, positions=[(40, 50)])]
    with pytest.raises(ValueError, match="nothing was steered"), torch.no_grad(), other.steer(beyond, enc.layout):
        other.model(**enc.inputs)


@pytest.mark.parametrize("backend", OTHER)
def test_hooks_removed_after_exception(pairs, enc, backend):
    other = pairs["llama"][backend]
    base = logits(other, enc)
    with pytest.raises(RuntimeError, match="inside"), other.steer(interventions(), enc.layout):
        raise RuntimeError("raised inside the steering context")
    # an error raised by the intervention itself, mid-forward: 2 per-row coefficients for 3 rows
    bad = [Intervention(1, torch.ones(64), torch.tensor([1.0, 2.0]))]
    with pytest.raises(ValueError, match="one coefficient per row"), other.steer(bad, enc.layout):
        other.model(**enc.inputs)
    torch.testing.assert_close(logits(other, enc), base, atol=0, rtol=0)


GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def gen_interventions() -> list[Intervention]:
    gen = torch.Generator().manual_seed(3)
    return [
        Intervention(1, torch.randn(64, generator=gen), torch.tensor([8.0, -8.0, 4.0]), positions="generated"),
        Intervention(0, torch.randn(64, generator=gen), 6.0, positions=[(4, 7)]),
    ]


@pytest.fixture(scope="module")
def generated(pairs, enc) -> dict:
    """Plain-transformers generations: unsteered, steered, and steered with every row stopping after one step."""
    ref, ivs = pairs["llama"]["hf"], gen_interventions()
    with torch.no_grad():
        out = {"plain": ref.model.generate(**enc.inputs, **GEN)}
        with ref.steer(ivs, enc.layout):
            out["steered"] = ref.model.generate(**enc.inputs, **GEN)
        out["eos"] = out["steered"][:, enc.input_ids.shape[1]].tolist()
        with ref.steer(ivs, enc.layout):
            out["stopped"] = ref.model.generate(**enc.inputs, **GEN, eos_token_id=out["eos"])
    return out


@pytest.mark.parametrize("backend", OTHER)
def test_generation_matches_plain_transformers(pairs, enc, generated, backend):
    other, ivs = pairs["llama"][backend], gen_interventions()
    with torch.no_grad():
        with other.steer(ivs, enc.layout):
            got = other.model.generate(**enc.inputs, **GEN)
        # every row stops at EOS after one step: the bounded step loop must end cleanly, still steered
        with other.steer(ivs, enc.layout):
            stopped = other.model.generate(**enc.inputs, **GEN, eos_token_id=generated["eos"])
    assert not torch.equal(generated["plain"], generated["steered"])  # the steering changes the tokens
    assert torch.equal(got, generated["steered"])
    assert stopped.shape[1] == enc.input_ids.shape[1] + 1 and torch.equal(stopped, generated["stopped"])


@pytest.mark.parametrize("backend", OTHER)
def test_kv_cache_prefix_reuse_matches(pairs, enc, backend):
    """A shared prefix's KV cache reused for a steered suffix gives the numbers of the full steered forward."""
    ref, other = pairs["llama"]["hf"], pairs["llama"][backend]
    cut = 6
    ivs = [Intervention(1, torch.ones(64), 2.0, positions="generated")]
    layout = RowLayout(prompt_len=enc.attention_mask[:, :cut].sum(1))
    with torch.no_grad():
        want = logits(ref, enc, ivs, layout)[:, cut:]
        cache = ref.model(input_ids=enc.input_ids[:, :cut], attention_mask=enc.attention_mask[:, :cut]).past_key_values
        with other.steer(ivs, layout):
            got = other.model(
                input_ids=enc.input_ids[:, cut:],
                attention_mask=enc.attention_mask,
                past_key_values=copy.deepcopy(cache),
                use_cache=True,
            ).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_nnsight_generation_needs_a_step_bound(pairs, enc):
    other = pairs["llama"]["nnsight"]
    saved, other.model.generation_config.max_new_tokens = other.model.generation_config.max_new_tokens, None
    try:
        with pytest.raises(ValueError, match="max_new_tokens"), other.steer(interventions(), enc.layout):
            other.model.generate(**enc.inputs, do_sample=False)
    finally:
        other.model.generation_config.max_new_tokens = saved


def test_nnsight_residual_norms_match(pairs, enc):
    from steering.backends.nnsight import hooks as nns
    from steering.hooks import mean_norms

    want = mean_norms(pairs["llama"]["hf"].model, enc.input_ids, enc.attention_mask)
    got = nns.mean_norms(pairs["llama"]["nnsight"].nnsight, enc.input_ids, enc.attention_mask)
    assert got.shape == (3,) and bool((got > 0).all())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_vectors_and_masks_follow_the_layer_device():
    """device_map="auto": a layer may live on another device than the embeddings (where positions are computed).
    Faked on the CPU with the meta device: the plan moves the mask and converts the vector once per device."""
    iv = Intervention(0, torch.ones(8), torch.tensor([1.0, 2.0]), positions=[(1, 3)])
    plan = Plan([iv], n_layers=2, d_model=8)
    ids, mask = padded_batch([4, 2])
    plan.tracker(None, (), {"input_ids": ids, "attention_mask": mask})
    out = plan.edit(0, torch.zeros(2, 4, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4, 8)
    cpu = plan.edit(0, torch.zeros(2, 4, 8))
    assert cpu[0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0] and cpu[1, :, 0].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert {key[1].type for key in plan._on_device} == {"meta", "cpu"}


def test_wrap_accepts_bridges_nnsight_models_and_steering_models(pairs, tokenizer):
    tlm, nsm = pairs["llama"]["transformer_lens"], pairs["llama"]["nnsight"]
    assert isinstance(wrap(tlm.bridge), TransformerLensModel) and wrap(tlm.bridge).bridge is tlm.bridge
    assert isinstance(wrap(nsm.nnsight), NNsightModel) and hf_module(wrap(nsm.nnsight)) is hf_module(nsm)
    assert wrap(tlm) is tlm and wrap_backend(tlm, "transformer_lens") is tlm
    plain = wrap(nsm, backend="hf")
    assert type(plain) is SteeringModel and plain.model is hf_module(nsm)
    assert wrap(hf_module(nsm), tokenizer=tokenizer).backend == "hf"
    with pytest.raises(ValueError, match="tokenizer"):
        wrap(hf_module(nsm))
    for bad in (object(), nsm.nnsight.model):  # a submodule's envoy is not a model
        with pytest.raises(ValueError, match="TransformerBridge"):
            wrap(bad)
    with pytest.raises(ValueError, match="transformer_lens"):
        wrap_backend(plain, "tensorflow")


def test_steer_checks_layers_and_layout(pairs, enc):
    for backend in OTHER:
        other = pairs["llama"][backend]
        with pytest.raises(ValueError, match="out of range"), other.steer([Intervention(7, torch.ones(64))]):
            pass
        with pytest.raises(ValueError, match="d_model"), other.steer([Intervention(0, torch.ones(32))]):
            pass
        with pytest.raises(ValueError, match="response_start"), other.steer(interventions()):
            pass
        with pytest.raises(ValueError, match="out of range"):
            other.capture(enc, [5])


@pytest.mark.slow
def test_default_model_parity(default_model):
    """SmolLM2-135M-Instruct: chat prompts, a relative coefficient on the response, greedy generation.

    Captures are compared relative to their norm: the last layers' residual reaches ~500, where float32 noise
    between the bridge's block components and transformers' own is ~3e-4 absolute (~1e-6 of the norm)."""
    from steering import load_model

    prompts = [
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    ]
    ref = default_model
    enc = ref.encode(prompts)
    gen = torch.Generator().manual_seed(0)
    iv = ref.intervention(15, torch.randn(ref.d_model, generator=gen), 4.0, positions="response", relative=True)
    base, want = logits(ref, enc), logits(ref, enc, [iv])
    assert (real(want, enc) - real(base, enc)).abs().max() > 1.0
    want_cap = ref.capture(enc, [3, 15, 29])
    want_text = ref.generate(prompts, max_new_tokens=6, interventions=[iv])
    for backend in OTHER:
        other = load_model("default", backend=backend)
        assert other.backend == backend
        torch.testing.assert_close(real(logits(other, enc, [iv]), enc), real(want, enc), atol=ATOL, rtol=0)
        torch.testing.assert_close(real(logits(other, enc), enc), real(base, enc), atol=ATOL, rtol=0)
        got_cap = other.capture(enc, [3, 15, 29])
        for layer in (3, 15, 29):
            error = (got_cap[layer] - want_cap[layer]).norm(dim=-1) / want_cap[layer].norm(dim=-1)
            assert float(error.max()) < 1e-5, (backend, layer, float(error.max()))
        assert other.generate(prompts, max_new_tokens=6, interventions=[iv]) == want_text
        del other


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("arch", ARCHS)
def test_readout_reads_the_steered_stream_as_plain_transformers(pairs, enc, arch, backend):
    """``model.readout`` inside ``steer``: the same projections at the last column as plain transformers (what a
    forced-choice sweep stores per row), or the backend refuses it."""
    gen = torch.Generator().manual_seed(11)
    directions = {0: torch.randn(2, 64, generator=gen), 1: torch.randn(3, 64, generator=gen)}
    values = {}
    for name in ("hf", backend):
        model = pairs[arch][name]
        with model.steer(interventions(), enc.layout), model.readout(directions) as read:
            model.model(**enc.inputs)
        values[name] = {layer: v.clone() for layer, v in read.items()}
    for layer in directions:
        torch.testing.assert_close(values[backend][layer], values["hf"][layer], atol=ATOL, rtol=ATOL)
