"""Interventions against independent references: exact shifts, exact positions under KV cache, clean removal."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, StepOracle, build_gemma3_multimodal, build_tiny, padded_batch, steered_positions

from steering.hooks import Intervention, RowLayout, capture, find_layers, steer

D = 64


def record_outputs(model: torch.nn.Module, ids, mask) -> list[torch.Tensor]:
    """Every decoder block's full output [B, T, d], recorded by hooks registered after any steering hooks."""
    outs: list[torch.Tensor] = []
    layers = find_layers(model)
    handles = [
        layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        for h in handles:
            h.remove()
    return outs


def assert_shifted(got: torch.Tensor, base: torch.Tensor, coef: float, vec: torch.Tensor) -> None:
    """``got`` is ``base + coef * vec`` to within one float32 ulp of the exact value (computed in float64): a fused
    multiply-add gives the correctly rounded sum, a multiply then an add are within one ulp of it."""
    exact = base.double() + coef * vec.double()
    ulp = (torch.nextafter(got.abs(), torch.tensor(float("inf"))) - got.abs()).double()
    assert ((got.double() - exact).abs() <= ulp).all()


def unit(seed: int = 1, d: int = D) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("positions", ["all", [(1, 4)], [[(0, 2)], [(3, None)], [(2, 3)]]])
def test_steered_layer_shifted_exactly_and_only_there(tiny_llama, positions):
    ids, mask = padded_batch([5, 7, 6], side="left")
    base = record_outputs(tiny_llama, ids, mask)
    vec, coef, layer = unit(), 3.0, 1
    iv = Intervention(layer, vec, coef, positions=positions)
    with steer(tiny_llama, iv):
        steered = record_outputs(tiny_llama, ids, mask)
    # Below the steered layer: unchanged, bit for bit.
    assert torch.equal(steered[0], base[0])
    # The steered layer: base + coef * vec exactly at the requested positions, unchanged elsewhere.
    row_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    want = torch.zeros_like(mask, dtype=torch.bool)
    rows = positions if isinstance(positions[0], list) else [positions] * 3
    for b in range(3):
        if positions == "all":
            want[b] = mask[b].bool()
            continue
        for start, end in rows[b]:
            want[b] |= (row_pos[b] >= start) & ((row_pos[b] < end) if end is not None else True) & mask[b].bool()
    assert want.any() and (~want).any()
    diff = steered[layer] - base[layer]
    assert_shifted(steered[layer][want], base[layer][want], coef, vec)
    assert torch.equal(diff[~want], torch.zeros_like(diff[~want]))
    # Above: changed.
    assert not torch.allclose(steered[2], base[2])


def test_coefficient_zero_is_bit_identical(tiny_llama):
    ids, mask = padded_batch([4, 6], side="left")
    with torch.no_grad():
        plain = tiny_llama(input_ids=ids, attention_mask=mask).logits
        gen_plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with steer(tiny_llama, [Intervention(1, unit(), 0.0), Intervention(2, unit(2), [0.0, 0.0])]), torch.no_grad():
        zero = tiny_llama(input_ids=ids, attention_mask=mask).logits
        gen_zero = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, zero)
    assert torch.equal(gen_plain, gen_zero)


LENGTHS = [4, 7, 5]
NEW = 4


@pytest.mark.parametrize("mode", ["all", "prompt", "generated", "response", "ranges"])
def test_position_oracle_under_kv_cache_generation(tiny_llama, mode):
    ids, mask = padded_batch(LENGTHS, side="left", seed=3)
    response_start = torch.tensor([2, 5, 3])
    layout = RowLayout(prompt_len=torch.tensor(LENGTHS), response_start=response_start)
    positions = [(3, 6)] if mode == "ranges" else mode
    with StepOracle(tiny_llama, 1) as oracle, steer(tiny_llama, Intervention(1, unit(), 1.0, positions), layout):
        oracle.arm()
        with torch.no_grad():
            tiny_llama.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
            )
    seen = steered_positions(oracle.calls, LENGTHS, ids.shape[1], recompute=False)
    for b, n in enumerate(LENGTHS):
        every = set(range(n + NEW - 1))  # the last sampled token is never fed back
        expected = {
            "all": every,
            "prompt": set(range(n)),
            "generated": set(range(n, n + NEW - 1)),  # includes the first sampled token, at position n
            "response": set(range(int(response_start[b]), n + NEW - 1)),
            "ranges": {3, 4, 5} & every,
        }[mode]
        assert seen[b] == expected, (mode, b)


def test_prompt_inferred_without_layout(tiny_llama):
    ids, mask = padded_batch(LENGTHS, side="left", seed=3)
    with StepOracle(tiny_llama, 0) as oracle, steer(tiny_llama, Intervention(0, unit(), 1.0, positions="generated")):
        oracle.arm()
        with torch.no_grad():
            tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3)
    assert steered_positions(oracle.calls, LENGTHS, ids.shape[1], recompute=False) == [
        set(range(n, n + 2)) for n in LENGTHS
    ]


def test_kv_cache_generation_equals_full_recompute(tiny_llama):
    ids, mask = padded_batch(LENGTHS, side="left", seed=5)
    layout = RowLayout(prompt_len=torch.tensor(LENGTHS))
    iv = Intervention(1, unit(), 4.0, positions="generated")
    outs = []
    for use_cache in (True, False):
        with steer(tiny_llama, iv, layout=layout), torch.no_grad():
            outs.append(
                tiny_llama.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache
                )
            )
    with torch.no_grad():
        plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], plain)


def test_per_row_coefficients_equal_rows_alone(tiny_llama):
    ids, mask = padded_batch([5, 5, 5], side="left", seed=7)
    coefs = [0.0, 2.5, -4.0]
    vec = unit(4)
    with steer(tiny_llama, Intervention(1, vec, coefs)), torch.no_grad():
        batched = tiny_llama(input_ids=ids, attention_mask=mask).logits
    for b, c in enumerate(coefs):
        with steer(tiny_llama, Intervention(1, vec, c)), torch.no_grad():
            alone = tiny_llama(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[1], batched[2])


def test_exception_inside_context_leaves_model_unsteered(tiny_llama):
    ids, mask = padded_batch([5, 6])
    with torch.no_grad():
        plain = tiny_llama(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_llama, Intervention(1, unit(), 10.0)):
        with torch.no_grad():
            assert not torch.equal(tiny_llama(input_ids=ids, attention_mask=mask).logits, plain)
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids=ids, attention_mask=mask).logits, plain)


def test_ablate_removes_the_direction(tiny_llama):
    ids, mask = padded_batch([6, 4])
    vec = unit(9) * 5.0
    with steer(tiny_llama, Intervention(1, vec, positions="all", operation="ablate")):
        out = record_outputs(tiny_llama, ids, mask)[1]
    proj = out @ (vec / vec.norm())
    assert proj[mask.bool()].abs().max() < 1e-4
    base = record_outputs(tiny_llama, ids, mask)[1]
    assert (base @ (vec / vec.norm()))[mask.bool()].abs().max() > 1e-2  # the direction was there before
    with steer(tiny_llama, Intervention(1, vec, 2.0, positions="all", operation="ablate_then_add")):
        out = record_outputs(tiny_llama, ids, mask)[1]
    torch.testing.assert_close((out @ (vec / vec.norm()))[mask.bool()], torch.full((10,), 10.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_equals_reference_at_positions(tiny_llama, side):
    ids, mask = padded_batch([5, 8, 3], side=side, seed=11)
    ref = record_outputs(tiny_llama, ids, mask)
    got = capture(tiny_llama, ids, mask, layers=[0, 2], at="last")
    last = mask.sum(1) - 1
    col = last if side == "right" else torch.full_like(last, ids.shape[1] - 1)
    for layer in (0, 2):
        assert got[layer].shape == (3, D)
        assert torch.equal(got[layer], ref[layer][torch.arange(3), col])
    # output_hidden_states agrees for blocks below the last (the last one may carry the final norm). A fresh copy:
    # transformers leaves its own recording hooks on a model asked for hidden states.
    with torch.no_grad():
        hs = build_tiny("llama")(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[0], hs[1][torch.arange(3), col])
    # Per-row indices and spans.
    got = capture(tiny_llama, ids, mask, layers=[1], at=[[0, -1], [2, 3], [1, 1]])[1]
    assert got.shape == (3, 2, D)
    start = ids.shape[1] - mask.sum(1) if side == "left" else torch.zeros(3, dtype=torch.long)
    assert torch.equal(got[1, 0], ref[1][1, start[1] + 2])


def test_capture_span_mean_and_offset(tiny_llama):
    from steering.hooks import At

    ids, mask = padded_batch([6, 4], side="left", seed=2)
    ref = record_outputs(tiny_llama, ids, mask)[0]
    mean = capture(tiny_llama, ids, mask, [0], At.mean([1, 0], [4, 2]))[0]
    torch.testing.assert_close(mean[0], ref[0, 1:4].mean(0))
    torch.testing.assert_close(mean[1], ref[1, 2:4].mean(0))
    second_last = capture(tiny_llama, ids, mask, [0], "last-1")[0]
    assert torch.equal(second_last, ref[:, -2])


@pytest.mark.parametrize("arch", ARCHITECTURES + ["gemma3_multimodal"])
def test_every_architecture_discovers_captures_and_steers(arch):
    model = build_gemma3_multimodal() if arch == "gemma3_multimodal" else build_tiny(arch)
    layers = find_layers(model)
    assert len(layers) == 3
    ids, mask = padded_batch([5, 7], side="left", seed=1)
    ref = record_outputs(model, ids, mask)
    got = capture(model, ids, mask, [0, 1, 2])
    for i in range(3):
        assert torch.equal(got[i], ref[i][:, -1])
    with steer(model, Intervention(1, unit(), 2.0, positions=[(2, 4)])):
        steered = record_outputs(model, ids, mask)
    assert torch.equal(steered[0], ref[0])
    delta = steered[1] - ref[1]
    row_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    hit = (row_pos >= 2) & (row_pos < 4)
    torch.testing.assert_close(delta[hit], (2.0 * unit()).expand(int(hit.sum()), D), atol=1e-6, rtol=0)
    assert torch.equal(delta[~hit], torch.zeros_like(delta[~hit]))
    assert not torch.allclose(steered[2], ref[2])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Intervention(1, torch.zeros(D + 1), 1.0), "d_model is 64"),
        (lambda: Intervention(5, unit(), 1.0), "out of range"),
        (lambda: Intervention(1, torch.full((D,), float("nan")), 1.0), "NaN or inf"),
        (lambda: Intervention(1, unit(), 1.0, positions="middle"), "unknown position mode"),
        (lambda: Intervention(1, unit(), 1.0, operation="scale"), "unknown operation"),
        (lambda: Intervention(1, unit(), [1.0, float("inf")]), "NaN or inf"),
    ],
)
def test_bad_input_raises_clear_errors(tiny_llama, make, match):
    with pytest.raises(ValueError, match=match), steer(tiny_llama, make()):
        pass


def test_per_row_coefficient_count_must_match_batch(tiny_llama):
    ids, mask = padded_batch([4, 4, 4])
    before = hook_count(tiny_llama)
    with (
        pytest.raises(ValueError, match="one coefficient per row"),
        steer(tiny_llama, Intervention(1, unit(), [1.0, 2.0])),
    ):
        assert hook_count(tiny_llama) > before
        tiny_llama(input_ids=ids, attention_mask=mask)
    assert hook_count(tiny_llama) == before


def test_response_positions_need_a_layout(tiny_llama):
    with (
        pytest.raises(ValueError, match="assistant turn"),
        steer(tiny_llama, Intervention(1, unit(), positions="response")),
    ):
        pass


def hook_count(model) -> int:
    """All hooks on the model's modules (transformers installs its own recorders: compare counts, not zero)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def no_hooks_left_behind(tiny_llama):
    """Every test in this file must leave the shared model with the hooks it had."""
    before = hook_count(tiny_llama)
    yield
    assert hook_count(tiny_llama) == before


def test_several_adds_at_one_layer_equal_their_sum_and_keep_order_with_ablation(tiny_llama):
    """Consecutive adds at a layer are fused into one matmul: the result is base + sum of each add (per-row
    coefficients, different positions); an ablation between adds still applies in the order given."""
    ids, mask = padded_batch([5, 7, 6], side="left")
    layer, v1, v2, v3 = 1, unit(1), unit(2), unit(3)
    adds = [
        Intervention(layer, v1, [1.0, 0.0, 2.0], positions="all"),
        Intervention(layer, v2, 3.0, positions=[(1, 4)]),
        Intervention(layer, v3, [0.5, -1.0, 0.0], positions=[[(0, 2)], [(3, None)], [(2, 3)]]),
    ]
    base = record_outputs(tiny_llama, ids, mask)[layer]
    with steer(tiny_llama, adds):
        fused = record_outputs(tiny_llama, ids, mask)[layer]
    row_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    expected = base.double().clone()
    for iv in adds:
        hit = iv.positions.mask(row_pos, None).double()[..., None]
        coef = torch.as_tensor(iv.coefficient, dtype=torch.float64).reshape(-1, 1, 1)
        expected += hit * coef * iv.vector.double()
    torch.testing.assert_close(fused.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(fused[mask == 0], base[mask == 0])

    ordered = [adds[0], Intervention(layer, v1, 0.0, operation="ablate"), adds[1]]
    with steer(tiny_llama, ordered):
        got = record_outputs(tiny_llama, ids, mask)[layer]
    want = base.double() + (row_pos >= 0).double()[..., None] * torch.tensor([1.0, 0.0, 2.0]).reshape(-1, 1, 1) * v1
    want = want - (want @ v1.double())[..., None] * v1.double() * (row_pos >= 0).double()[..., None]
    want = want + adds[1].positions.mask(row_pos, None).double()[..., None] * 3.0 * v2.double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
