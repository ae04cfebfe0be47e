"""Issue 19, hooks and models: holes a second skeptical audit found, each pinned to values.

Thread-scoped steering, coefficients that overflow, vectors whose norm overflows float32, explicit positions that
touch nothing, empty prompts, generation past the context, ``hooks.capture`` keys, numpy / 0-d scalars."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import padded_batch

from steering.coefficients import relative_scale
from steering.hooks import At, Intervention, Positions, capture, find_layers, steer


def unit(seed: int = 1, d: int = 64) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def in_thread(fn):
    """Run ``fn`` in a new thread and return its result (re-raising its exception)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(scope="module")
def tiny(tiny_chat):
    return tiny_chat


# ---- a steer context is scoped to the thread that entered it ----------------------------------------------------
def test_a_plain_forward_in_another_thread_is_not_steered(tiny_llama):
    ids, mask = padded_batch([6, 4], seed=3)
    plain = logits(tiny_llama, ids, mask)
    with steer(tiny_llama, Intervention(1, unit(), 8.0)):
        steered = logits(tiny_llama, ids, mask)
        other = in_thread(lambda: logits(tiny_llama, ids, mask))
    assert not torch.allclose(steered, plain, atol=1e-3)  # the steering is real
    assert torch.equal(other, plain)  # ... and stays in the thread that entered the block


def test_steered_and_plain_forwards_interleaved_in_two_threads_each_get_their_own_numbers(tiny):
    """Thread A is paused inside its steered forward (after the position tracker ran) while thread B runs a plain
    forward of another shape: B is plain, and A's positions are not clobbered by B's call."""
    enc_a = tiny.encode(["the quick brown fox jumps over the lazy dog"])
    enc_b = tiny.encode(["hi", "a longer second row here"])
    iv = tiny.intervention(1, unit(), 6.0, positions=[(2, 5)])
    with torch.no_grad(), tiny.steer(iv):
        alone = tiny.model(**enc_a.inputs).logits
    plain_b = logits(tiny.model, enc_b.input_ids, enc_b.attention_mask)
    paused, resume = threading.Event(), threading.Event()
    block0 = find_layers(tiny.model)[0]

    def pause(module, args, output):
        if threading.current_thread().name == "steered":
            paused.set()
            assert resume.wait(30)

    handle = block0.register_forward_hook(pause)
    got: dict = {}

    def steered_forward():
        with torch.no_grad(), tiny.steer(iv):
            got["a"] = tiny.model(**enc_a.inputs).logits

    try:
        thread = threading.Thread(target=steered_forward, name="steered")
        thread.start()
        assert paused.wait(30)
        got["b"] = logits(tiny.model, enc_b.input_ids, enc_b.attention_mask)
        resume.set()
        thread.join(30)
    finally:
        resume.set()
        handle.remove()
    assert torch.equal(got["b"], plain_b)
    assert torch.equal(got["a"], alone)


def test_capture_reads_only_its_own_threads_forward(tiny_llama):
    """Capture in thread A is paused inside its forward while thread B runs another forward of the same model."""
    ids, mask = padded_batch([5], seed=4)
    other_ids, other_mask = padded_batch([9, 7], seed=5)
    want = capture(tiny_llama, ids, mask, [1, 2])
    plain_other = logits(tiny_llama, other_ids, other_mask)
    paused, resume = threading.Event(), threading.Event()

    def pause(module, args, output):
        if threading.current_thread().name == "capturing":
            paused.set()
            assert resume.wait(30)

    handle = find_layers(tiny_llama)[0].register_forward_hook(pause)
    got: dict = {}

    def capturing():
        got["a"] = capture(tiny_llama, ids, mask, [1, 2])

    try:
        thread = threading.Thread(target=capturing, name="capturing")
        thread.start()
        assert paused.wait(30)
        got["b"] = logits(tiny_llama, other_ids, other_mask)
        resume.set()
        thread.join(30)
    finally:
        resume.set()
        handle.remove()
    assert torch.equal(got["b"], plain_other)  # capture's early stop did not cut the other thread's forward short
    assert all(torch.equal(got["a"][k], want[k]) for k in (1, 2))


# ---- coefficients and norms that overflow ------------------------------------------------------------------------
@pytest.mark.parametrize("coefficient", [1e30, 1e300, -1e30, [1.0, 1e30]])
def test_a_coefficient_that_would_overflow_is_refused_up_front(coefficient):
    with pytest.raises(ValueError, match=r"coefficient.*(overflow|too large)"):
        Intervention(1, unit(), coefficient)


def test_a_large_but_meaningful_coefficient_is_accepted():
    assert Intervention(1, unit(), 5e4).coefficient == 5e4


def test_relative_steering_with_a_vector_whose_float32_norm_overflows_adds_the_right_norm(tiny):
    vector = torch.full((64,), 1e38)  # finite in float32; its float32 norm is inf
    residual = float(tiny.residual_norms()[1])
    iv = tiny.intervention(1, vector, 1.0, relative=True)
    assert not iv.is_noop
    added = (torch.as_tensor(iv.coefficient, dtype=torch.float64) * vector.double()).norm()
    assert float(added) == pytest.approx(residual, rel=1e-5)
    enc = tiny.encode(["hello there"])
    plain = tiny.model(**enc.inputs).logits
    with torch.no_grad(), tiny.steer(iv):
        steered = tiny.model(**enc.inputs).logits
    assert torch.isfinite(steered).all() and not torch.allclose(steered, plain, atol=1e-3)


@pytest.mark.parametrize("vector", [torch.zeros(64), torch.full((64,), 1e-45)])
def test_relative_scale_refuses_zero_and_non_finite_scales(vector):
    with pytest.raises(ValueError, match="relative"):
        relative_scale(vector, 10.0)


# ---- explicit positions that touch no token ---------------------------------------------------------------------
def test_explicit_positions_beyond_every_row_are_an_error_not_a_silent_no_op(tiny):
    iv = tiny.intervention(1, unit(), 4.0, positions=[(500, 600)])
    with pytest.raises(ValueError, match=r"positions.*beyond"):
        tiny.generate(["hello there"], max_new_tokens=3, interventions=[iv])
    enc = tiny.encode(["hello there"])
    with pytest.raises(ValueError, match=r"positions.*beyond"), torch.no_grad(), tiny.steer(iv, enc.layout):
        tiny.model(**enc.inputs)
    per_row = tiny.intervention(1, unit(), 4.0, positions=[[(0, 2)], [(300, 400)]])
    enc2 = tiny.encode(["hello there", "general kenobi"])
    with pytest.raises(ValueError, match=r"row 1"), torch.no_grad(), steer(tiny.model, per_row, enc2.layout):
        tiny.model(**enc2.inputs)


def test_explicit_positions_partly_inside_still_steer(tiny):
    enc = tiny.encode(["hello there general kenobi"])
    plain = tiny.model(**enc.inputs).logits
    with torch.no_grad(), tiny.steer(tiny.intervention(1, unit(), 4.0, positions=[(2, 600)])):
        steered = tiny.model(**enc.inputs).logits
    assert not torch.allclose(plain, steered, atol=1e-4)
    # positions reached only by generated tokens count: the prompt has fewer than 6 tokens
    n = int(enc.layout.prompt_len[0])
    iv = tiny.intervention(1, unit(), 4.0, positions=[(n + 1, n + 2)])
    assert len(tiny.generate(["hello there general kenobi"], max_new_tokens=3, interventions=[iv])) == 1


# ---- empty prompts, and generation past the context --------------------------------------------------------------
@pytest.mark.parametrize("call", ["encode", "generate", "capture"])
@pytest.mark.parametrize("prompts", [[""], ["hello", ""]])
def test_empty_prompts_are_a_clear_error(tiny, call, prompts):
    from transformers import AutoTokenizer

    from steering import SteeringModel
    from steering.default_model import fetch_default_model

    tokenizer = AutoTokenizer.from_pretrained(fetch_default_model())
    tokenizer.chat_template = None  # plain text: an empty string encodes to no tokens at all
    model = SteeringModel(tiny.model, tokenizer, name="tiny-plain")
    fn = {"encode": model.encode, "generate": model.generate, "capture": model.capture}[call]
    with pytest.raises(ValueError, match=r"prompt \d+ is empty|encodes to no tokens"):
        fn(prompts)


def test_prompt_plus_new_tokens_past_the_context_is_refused_before_compute(tiny):
    limit = tiny.context_limit
    with pytest.raises(ValueError, match=rf"max_new_tokens.*at most {limit}"):
        tiny.generate(["hello there"], max_new_tokens=limit)
    assert len(tiny.generate(["hello there"], max_new_tokens=2)) == 1


# ---- hooks.capture keys, numpy and 0-d scalars ------------------------------------------------------------------
def test_hooks_capture_keys_are_the_resolved_layers(tiny_llama):
    ids, mask = padded_batch([5, 3], seed=2)
    got = capture(tiny_llama, ids, mask, [-1, 0])
    assert sorted(got) == [0, 2]
    assert torch.equal(got[2], capture(tiny_llama, ids, mask, [2])[2])


@pytest.mark.parametrize(
    "coefficient", [np.float32(2.5), np.float64(2.5), torch.tensor(2.5), np.array(2.5), torch.tensor([2.5])[0]]
)
def test_numpy_and_0d_coefficients_are_scalars(tiny_llama, coefficient):
    iv = Intervention(1, unit(), coefficient)
    assert isinstance(iv.coefficient, float) and iv.coefficient == 2.5
    ids, mask = padded_batch([4, 6], seed=6)
    with steer(tiny_llama, iv):
        got = logits(tiny_llama, ids, mask)
    with steer(tiny_llama, Intervention(1, unit(), 2.5)):
        want = logits(tiny_llama, ids, mask)
    assert torch.equal(got, want)


def test_numpy_int_coefficients_and_range_bounds_are_accepted():
    assert Intervention(0, unit(), np.int64(3)).coefficient == 3.0
    for bounds in [(np.int64(1), np.int64(4)), (torch.tensor(1), torch.tensor(4)), (np.int32(1), 4)]:
        assert Positions.parse([bounds]).ranges == ((1, 4),)
    assert Positions.parse([[(np.int64(0), None)], [(2, np.int16(3))]]).ranges == (((0, None),), ((2, 3),))
    with pytest.raises(ValueError, match="range"):
        Positions.parse([(1.5, 3)])
    assert torch.equal(At.parse(np.int64(-2), 3).index, torch.full((3,), -2))
