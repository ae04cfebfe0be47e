"""Which positions get steered, however a forward call hands over its KV cache (issue: transformers 5.24 `cache=`).

The oracle (``conftest.StepOracle``) compares a steered layer's output with and without our hook from outside the
engine; expected row positions are computed here from the known prompt lengths and step counts.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import StepOracle, padded_batch, steered_positions

from steering.hooks import Intervention, PositionTracker, RowLayout, find_stack, steer

LAYER = 1
N = 5  # prompt length for unpadded batches
LENGTHS = [4, 7, 5]  # prompt lengths for left-padded batches
STEPS = 3


def unit(d: int = 64) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    return v / v.norm()


def cache_names(model) -> list[str]:
    """KV-cache keyword names the installed transformers accepts (``cache`` from 5.24 on)."""
    params = inspect.signature(find_stack(model).forward).parameters
    return ["past_key_values"] + (["cache"] if "cache" in params else [])


def expected(mode: str, n: int, fed: int) -> set:
    """Row positions a mode covers when ``fed`` tokens (prompt + fed-back samples) went through the model."""
    return {"all": set(range(fed)), "prompt": set(range(n)), "generated": set(range(n, fed))}[mode]


def manual_decode(model, ids, mask, name: str, layout, mode: str) -> list[set]:
    """Prefill then STEPS greedy decode steps by hand, the cache passed as ``name``; mask optional."""
    lengths = [int(x) for x in (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1]))]
    with (
        StepOracle(model, LAYER) as oracle,
        torch.no_grad(),
        steer(model, Intervention(LAYER, unit(), 1.0, positions=mode), layout=layout),
    ):
        oracle.arm()
        kwargs = {} if mask is None else {"attention_mask": mask}
        out = model(input_ids=ids, use_cache=True, **kwargs)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(STEPS):
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                kwargs = {"attention_mask": mask}
            out = model(input_ids=token, use_cache=True, **{name: cache}, **kwargs)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return steered_positions(oracle.calls, lengths, ids.shape[1], recompute=False)


@pytest.mark.parametrize("mode", ["all", "prompt", "generated"])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_layout", [True, False])
def test_manual_decode_loop_steers_exact_positions(tiny_llama, mode, with_mask, with_layout):
    for name in cache_names(tiny_llama):
        if with_mask:
            ids, mask = padded_batch(LENGTHS, side="left", seed=3)
            lengths = LENGTHS
        else:
            ids, mask = padded_batch([N, N], seed=3)[0], None
            lengths = [N, N]
        layout = RowLayout(prompt_len=torch.tensor(lengths)) if with_layout else None
        seen = manual_decode(tiny_llama, ids, mask, name, layout, mode)
        for b, n in enumerate(lengths):
            assert seen[b] == expected(mode, n, n + STEPS), (name, b)


@pytest.mark.parametrize("mode", ["prompt", "generated"])
@pytest.mark.parametrize("with_layout", [True, False])
def test_generate_without_cache_steers_exact_positions(tiny_llama, mode, with_layout):
    """``use_cache=False`` recomputes the whole sequence each step: the first call of the context is the prompt."""
    ids, mask = padded_batch(LENGTHS, side="left", seed=3)
    layout = RowLayout(prompt_len=torch.tensor(LENGTHS)) if with_layout else None
    with (
        StepOracle(tiny_llama, LAYER) as oracle,
        torch.no_grad(),
        steer(tiny_llama, Intervention(LAYER, unit(), 1.0, positions=mode), layout=layout),
    ):
        oracle.arm()
        tiny_llama.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1,
                do_sample=False, use_cache=False,
            )  # fmt: skip
    assert len(oracle.calls) == STEPS + 1
    seen = steered_positions(oracle.calls, LENGTHS, ids.shape[1], recompute=True)
    for b, n in enumerate(LENGTHS):
        assert seen[b] == expected(mode, n, n + STEPS), b


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_without_layout_steers_generated_tokens(tiny_llama, use_cache):
    """The failure transformers 5.24 caused: ``generated`` steered nothing and ``prompt`` every generated token."""
    ids, mask = padded_batch(LENGTHS, side="left", seed=3)
    for mode in ("generated", "prompt"):
        with (
            StepOracle(tiny_llama, LAYER) as oracle,
            torch.no_grad(),
            steer(tiny_llama, Intervention(LAYER, unit(), 1.0, positions=mode)),
        ):
            oracle.arm()
            tiny_llama.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1,
                    do_sample=False, use_cache=use_cache,
                )  # fmt: skip
        seen = steered_positions(oracle.calls, LENGTHS, ids.shape[1], recompute=not use_cache)
        assert seen == [expected(mode, n, n + STEPS) for n in LENGTHS], mode


def test_a_new_prompt_in_the_same_context_gets_its_own_layout(tiny_llama):
    """Two generate calls on different prompts inside one context: each call's prompt is its own."""
    first, first_mask = padded_batch(LENGTHS, side="left", seed=3)
    second, second_mask = padded_batch([6, 3, 8], side="left", seed=4)
    with (
        StepOracle(tiny_llama, LAYER) as oracle,
        torch.no_grad(),
        steer(tiny_llama, Intervention(LAYER, unit(), 1.0, positions="generated")),
    ):
        oracle.arm()
        for ids, mask in ((first, first_mask), (second, second_mask)):
            tiny_llama.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                    use_cache=False,
                )  # fmt: skip
    second_calls = oracle.calls[3:]
    seen = steered_positions(second_calls, [6, 3, 8], second.shape[1], recompute=True)
    assert seen == [set(range(n, n + 2)) for n in (6, 3, 8)]


def test_cache_filled_outside_the_context_needs_a_layout(tiny_llama):
    ids, mask = padded_batch([N, N], seed=3)
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with (
            pytest.raises(ValueError, match="layout"),
            steer(tiny_llama, Intervention(LAYER, unit(), 1.0, positions="generated")),
        ):
            tiny_llama(input_ids=token, past_key_values=cache, use_cache=True)
        # with a layout the same call is steered at exactly row position N
        with StepOracle(tiny_llama, LAYER) as oracle:
            layout = RowLayout(prompt_len=torch.tensor([N, N]))
            with steer(tiny_llama, Intervention(LAYER, unit(), 1.0, positions="generated"), layout=layout) as tracker:
                oracle.arm()
                tiny_llama(input_ids=token, past_key_values=cache, use_cache=True)
                assert tracker.positions.tolist() == [[N], [N]]
    assert oracle.calls[0].all()


class OpaqueCache:
    """A cache object whose length the tracker cannot read."""


@pytest.mark.parametrize(
    "kwargs, positions",
    [
        ({"cache": "dynamic"}, [[4], [4]]),
        ({"past_key_values": "dynamic"}, [[4], [4]]),
        ({"past_key_values": "legacy"}, [[4], [4]]),
        ({"cache_position": torch.tensor([4])}, [[4], [4]]),
        ({"cache": "opaque", "attention_mask": torch.ones(2, 5, dtype=torch.long)}, [[4], [4]]),
        ({"cache": "opaque", "position_ids": torch.tensor([[7], [7]])}, [[7], [7]]),
    ],
)
def test_tracker_reads_the_cache_length_under_every_name(kwargs, positions):
    from transformers import DynamicCache

    past = DynamicCache()
    past.update(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), 0)
    legacy = ((torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8)),)
    given = {"dynamic": past, "legacy": legacy, "opaque": OpaqueCache()}
    kwargs = {k: given.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    tracker = PositionTracker(RowLayout(prompt_len=torch.tensor([3, 3])))
    tracker(None, (), {"input_ids": torch.zeros(2, 1, dtype=torch.long), **kwargs})
    assert tracker.positions.tolist() == positions


def test_tracker_refuses_to_guess_positions():
    tracker = PositionTracker()
    with pytest.raises(ValueError, match="pass attention_mask"):
        tracker(None, (), {"input_ids": torch.zeros(2, 1, dtype=torch.long), "cache": OpaqueCache()})
