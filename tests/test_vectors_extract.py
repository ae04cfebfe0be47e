"""Extraction on a tiny random Llama: parity with output_hidden_states, padding invariance, methods, quality."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from steering import SteeringModel
from steering.hooks import resolve_layers
from steering.vectors import (
    ContrastPair,
    best_layers,
    caa_pair,
    collect_activations,
    extract,
    layer_quality,
    mean_diff,
    pair_texts,
    pairs_sha256,
    pca,
    probe,
    projection_quality,
)
from steering.vectors.extract import completion_span, plan_batches

extract_mod = sys.modules["steering.vectors.extract"]  # the package's `extract` is the function

TOKENIZER = Path.home() / ".cache" / "steering" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny() -> SteeringModel:
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("the default model's tokenizer is not cached; run `steering fetch`")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    return SteeringModel(LlamaForCausalLM(config).eval(), tokenizer, name="tiny-llama")


def _pairs(n: int = 7) -> list[ContrastPair]:
    # prompts of different lengths so batches need padding; letters alternate so A/B are balanced
    out = []
    for i in range(n):
        question = f"Case {i}: {'the farm ' * (1 + 3 * i)}needs a decision.\n\nChoices:\n(A) protect\n(B) ignore"
        out.append(caa_pair(question, "(A)" if i % 2 == 0 else "(B)", "(B)" if i % 2 == 0 else "(A)", id=str(i)))
    return out


def _reference(model: SteeringModel, pairs, layer: int, position: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent activations [N, d]: one unpadded forward per text with output_hidden_states=True."""
    tok = model.tokenizer
    sides = []
    for side in ("positive", "negative"):
        rows = []
        for pair in pairs:
            prefix = tok.apply_chat_template(
                [{"role": "user", "content": pair.prompt}], tokenize=False, add_generation_prompt=True
            )
            n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
            ids = tok(prefix + getattr(pair, side), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                hidden = model.model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # no lm_head
            h = hidden[layer + 1][0]  # hidden_states[0] is the embedding output; [i + 1] is block i's output
            rows.append(h[-1] if position == "answer" else h[n_prefix:].mean(dim=0))
        sides.append(torch.stack(rows))
    return sides[0], sides[1]


@pytest.mark.parametrize("position", ["answer", "mean"])
def test_mean_diff_matches_output_hidden_states(tiny, position):
    pairs = _pairs()  # 4 pairs with the positive answer at (A), 3 at (B)
    vs = extract(tiny, pairs, layers=[0, 1], position=position, normalize="none", batch_size=3, progress=False)
    plain = extract(tiny, pairs, layers=[0, 1], position=position, normalize="none", progress=False, balance=False)
    assert (vs.method, plain.method) == ("mean_diff+balanced", "mean_diff")
    a = torch.tensor([p.positive_letter == "A" for p in pairs])
    for layer in (0, 1):  # the last block's hidden_states entry has the final norm applied, so test below it
        pos, neg = _reference(tiny, pairs, layer, position)
        expected = pos.mean(dim=0) - neg.mean(dim=0)
        assert float(expected.norm()) > 1e-3
        torch.testing.assert_close(plain[layer], expected, atol=1e-5, rtol=1e-4)
        balanced = ((pos[a] - neg[a]).mean(dim=0) + (pos[~a] - neg[~a]).mean(dim=0)) / 2  # each letter group half
        torch.testing.assert_close(vs[layer], balanced, atol=1e-5, rtol=1e-4)


def test_left_and_right_padding_and_batch_size_give_the_same_vectors(tiny):
    pairs = _pairs()
    left = extract(tiny, pairs, normalize="none", batch_size=4, progress=False, padding_side="left")
    right = extract(tiny, pairs, normalize="none", batch_size=4, progress=False, padding_side="right")
    single = extract(tiny, pairs, normalize="none", batch_size=1, progress=False)
    assert left.layers == right.layers == [0, 1, 2]
    for layer in left.layers:
        assert float((left[layer] - right[layer]).abs().max()) < 1e-5
        assert float((left[layer] - single[layer]).abs().max()) < 1e-5


def test_collect_activations_keeps_input_order_and_pairing(tiny):
    pairs = _pairs(5)
    pos, neg = collect_activations(tiny, pairs, [1], batch_size=2, progress=False)
    ref_pos, ref_neg = _reference(tiny, pairs, 1, "answer")
    assert pos[1].shape == (5, 64) and pos[1].dtype == torch.float32
    torch.testing.assert_close(pos[1], ref_pos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(neg[1], ref_neg, atol=1e-5, rtol=1e-4)


def test_capture_stops_after_the_deepest_requested_layer(tiny):
    calls = []
    handle = tiny.layers[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        extract(tiny, _pairs(3), layers=[0, 1], progress=False)
        assert calls == []
        extract(tiny, _pairs(3), layers=[2], batch_size=2, progress=False)
        assert len(calls) == 2  # one forward pass per batch of pairs, positives and negatives together
    finally:
        handle.remove()


def _forward_calls(model: SteeringModel) -> list[int]:
    """A list that grows by the batch size of every forward pass through block 0 (remove with ``.handle``)."""
    calls: list[int] = []
    handle = model.layers[0].register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    return calls, handle


@pytest.mark.parametrize("position", ["answer", "mean", "last"])
def test_token_budget_batches_give_the_same_activations(tiny, position):
    pairs = _pairs()
    lengths = [len(tiny.encode(pair_texts(tiny, p)[1]).input_ids[0]) for p in pairs]
    assert len(set(lengths)) == len(pairs)  # every batch of two or more pairs is padded
    ref_pos, ref_neg = collect_activations(tiny, pairs, [0, 2], position, max_batch_tokens=1, progress=False)
    calls, handle = _forward_calls(tiny)
    try:
        for kwargs in (dict(max_batch_tokens=10**6), dict(max_batch_tokens=5 * max(lengths)), dict(batch_size=2)):
            calls.clear()
            pos, neg = collect_activations(tiny, pairs, [0, 2], position, progress=False, **kwargs)
            for layer in (0, 2):
                torch.testing.assert_close(pos[layer], ref_pos[layer], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(neg[layer], ref_neg[layer], atol=1e-5, rtol=1e-4)
            budget = kwargs.get("max_batch_tokens", extract_mod.CPU_EXTRACT_TOKENS)
            planned = plan_batches(lengths, budget, kwargs.get("batch_size"))
            assert calls == [2 * len(batch) for batch in planned]
    finally:
        handle.remove()
    assert 1 < len(plan_batches(lengths, 5 * max(lengths))) < len(pairs)  # several batches, padded ones among them


def test_plan_batches_sorts_by_length_and_fills_the_token_budget():
    lengths = [10, 50, 30, 40, 20, 5]
    assert plan_batches(lengths, 10**6) == [[1, 3, 2, 4, 0, 5]]
    # 2 texts x pairs x longest: [50, 40] -> 200 tokens; [30, 20, 10] -> 180; [5] alone would fit but comes last
    assert plan_batches(lengths, 200) == [[1, 3], [2, 4, 0], [5]]
    assert plan_batches(lengths, 200, batch_size=2) == [[1, 3], [2, 4], [0, 5]]
    assert plan_batches(lengths, 1) == [[1], [3], [2], [4], [0], [5]]  # a pair over the budget runs alone


def test_host_token_ids_that_disagree_with_encode_fall_back_to_the_model(tiny, monkeypatch):
    pairs = _pairs(5)
    ref_pos, ref_neg = _reference(tiny, pairs, 1, "answer")
    host = extract_mod._token_ids
    monkeypatch.setattr(extract_mod, "_token_ids", lambda model, texts: [ids + [7] for ids in host(model, texts)])
    pos, neg = collect_activations(tiny, pairs, [1], progress=False)
    torch.testing.assert_close(pos[1], ref_pos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(neg[1], ref_neg, atol=1e-5, rtol=1e-4)


def test_normalisation_and_metadata(tiny):
    pairs = _pairs()
    unit = extract(tiny, pairs, layers="0,2", progress=False, driver="toy")
    assert unit.layers == [0, 2]
    assert all(abs(n - 1.0) < 1e-6 for n in unit.norms().values())
    assert (unit.driver, unit.model, unit.method, unit.position, unit.normalized) == (
        "toy",
        "tiny-llama",
        "mean_diff+balanced",  # A/B pairs: balanced over the positive answer's letter
        "answer",
        "unit",
    )
    assert unit.n_pairs == len(pairs) and unit.d_model == 64
    assert unit.dataset_sha256 == pairs_sha256(pairs)
    residual = extract(tiny, pairs, layers=[1], normalize="residual", progress=False)
    assert residual.norms()[1] == pytest.approx(float(tiny.residual_norms()[1]), rel=1e-5)
    raw = extract(tiny, pairs, layers=[1], normalize="none", progress=False)
    cosine = torch.nn.functional.cosine_similarity(raw[1], residual[1], dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments_get_clear_errors(tiny):
    pairs = _pairs(2)
    with pytest.raises(ValueError, match="no contrast pairs"):
        extract(tiny, [], progress=False)
    with pytest.raises(ValueError, match="out of range: the model has 3 layers"):
        extract(tiny, pairs, layers=[5], progress=False)
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        extract(tiny, pairs, method="svm", progress=False)
    with pytest.raises(ValueError, match="unknown read position"):
        extract(tiny, pairs, position="first", progress=False)
    with pytest.raises(ValueError, match="unknown normalize"):
        extract(tiny, pairs, normalize="l1", progress=False)
    with pytest.raises(ValueError, match="ContrastPair objects"):
        extract(tiny, [("q", "(A", "(B")], progress=False)
    assert resolve_layers(-1, tiny.n_layers) == [2]


def test_out_of_range_layers_give_the_one_message():
    assert resolve_layers([-1, 0, -3], 3) == [0, 2]
    for bad in (3, -4):
        with pytest.raises(ValueError) as info:
            resolve_layers([bad], 3)
        assert str(info.value) == f"layer {bad} is out of range: the model has 3 layers (0..2, or -3..-1 from the end)"


def test_pair_texts_use_the_chat_template_and_letter_last(tiny):
    prefix, positive, negative = pair_texts(tiny, _pairs(1)[0])
    assert prefix.endswith("<|im_start|>assistant\n") and positive == prefix + "(A" and negative == prefix + "(B"
    ids = tiny.tokenizer(positive, add_special_tokens=False)["input_ids"]
    assert tiny.tokenizer.convert_ids_to_tokens(ids[-1]) == "A"


def test_completion_span_handles_merges_and_appended_special_tokens():
    assert completion_span([1, 2, 3], [1, 2, 3, 4, 5]) == (3, 5)
    assert completion_span([1, 2, 3], [1, 2, 9, 5]) == (2, 4)  # last prefix token merged with the completion
    assert completion_span([1, 2, 3, 0], [1, 2, 3, 4, 5, 0]) == (3, 5)  # EOS appended to both


# ---- methods -----------------------------------------------------------------------------------------------
def _planted(n: int = 200, d: int = 32, seed: int = 0, shift: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    scales = torch.linspace(0.2, 3.0, d)  # anisotropic noise: the mean difference is not the best separator
    base = torch.randn(n, d, generator=g) * scales
    pos = base + torch.randn(n, d, generator=g) * scales * 0.3 + shift * direction
    neg = base + torch.randn(n, d, generator=g) * scales * 0.3 - shift * direction
    return pos, neg, direction


def test_mean_diff_is_the_difference_of_means():
    pos, neg, _ = _planted()
    expected = pos.double().mean(0) - neg.double().mean(0)
    torch.testing.assert_close(mean_diff(pos, neg).double(), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        mean_diff(pos, neg[:, :5])


def test_pca_sign_agrees_with_the_mean_difference():
    pos, neg, direction = _planted()
    for a, b in ((pos, neg), (neg, pos)):
        vector = pca(a, b)
        md = mean_diff(a, b)
        assert float(vector @ md) > 0
        # scaled to the mean difference's projection on the component
        unit = vector / vector.norm()
        assert float(vector.norm()) == pytest.approx(float(md @ unit), rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(pca(pos, neg), direction, dim=0))) > 0.9


def test_probe_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(1)
    d, n = 24, 300
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    # a large nuisance shift along another axis: mean_diff is pulled off the planted direction, the probe is not
    nuisance = torch.zeros(d)
    nuisance[0] = 1.0
    nuisance -= (nuisance @ direction) * direction
    nuisance /= nuisance.norm()
    noise = torch.randn(2 * n, d, generator=g) * 0.5
    big = torch.randn(2 * n, generator=g) * 6.0
    x = noise + big[:, None] * nuisance
    labels = torch.arange(2 * n) < n
    x = x + torch.where(labels[:, None], 0.6, -0.6) * direction + torch.where(labels[:, None], 2.0, 0.0) * nuisance
    pos, neg = x[:n], x[n:]
    vector = probe(pos, neg)
    cos_probe = float(torch.nn.functional.cosine_similarity(vector, direction, dim=0))
    cos_mean = float(torch.nn.functional.cosine_similarity(mean_diff(pos, neg), direction, dim=0))
    assert cos_probe > 0.9
    assert cos_mean < cos_probe  # the probe is doing something the mean difference cannot
    assert float(vector @ mean_diff(pos, neg)) > 0
    assert projection_quality(vector, pos, neg)["accuracy"] > 0.9


def test_extract_with_pca_and_probe_on_the_model(tiny):
    pairs = _pairs()
    md = extract(tiny, pairs, layers=[1], progress=False)
    for method in ("pca", "probe"):
        vs = extract(tiny, pairs, layers=[1], method=method, progress=False)
        assert vs.method == method + "+balanced" and float(vs.norms()[1]) == pytest.approx(1.0, abs=1e-6)
        assert float(vs[1] @ md[1]) > 0


# ---- quality -----------------------------------------------------------------------------------------------
def test_projection_quality_values():
    vector = torch.tensor([1.0, 0.0])
    pos = torch.tensor([[2.0, 5.0], [1.0, -3.0], [0.0, 1.0], [3.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 9.0], [1.0, 1.0]])
    q = projection_quality(vector * 4, pos, neg)
    assert q["accuracy"] == pytest.approx(0.75)
    assert q["mean_gap"] == pytest.approx((1 - 1 + 1 + 2) / 4)
    p, n = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, -1.0, 1.0])
    pooled = ((p.var(unbiased=False) + n.var(unbiased=False)) / 2).sqrt()
    assert q["separation"] == pytest.approx(float((p.mean() - n.mean()) / pooled))


def test_layer_quality_and_best_layers(tiny):
    pairs = _pairs()
    vs = extract(tiny, pairs, progress=False)
    table = layer_quality(tiny, vs, pairs)
    assert list(table["layer"]) == [0, 1, 2]
    assert list(table.columns) == [
        "layer",
        "accuracy",
        "separation",
        "mean_gap",
        "n_pairs",
        "letter_cosine",
        "worst_group_accuracy",
        "accuracy_A",
        "accuracy_B",
    ]
    assert (table["n_pairs"] == len(pairs)).all()
    assert table["accuracy"].between(0, 1).all()
    vs.quality = table
    assert vs.best_layers(3) == best_layers(table, 3)
    assert sorted(vs.best_layers(3)) == [0, 1, 2]
    import pandas as pd

    fake = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.7, 0.9, 0.9], "separation": [3.0, 1.0, 2.0]})
    assert best_layers(fake, 2) == [2, 1]
    with pytest.raises(ValueError, match="lacks accuracy"):
        best_layers(fake.drop(columns="accuracy"))


# ---- the answer-letter confound ----------------------------------------------------------------------------
def _lettered(n_a: int, n_b: int, d: int = 32, letter: float = 4.0, concept: float = 0.5, seed: int = 0):
    """Synthetic A/B activations: each completion = base + concept_sign * concept * c + letter_sign * letter * l.

    n_a pairs have the positive answer at (A), n_b at (B); the letter direction l is much larger than the concept c.
    """
    g = torch.Generator().manual_seed(seed)
    c, l_dir = torch.randn(d, generator=g), torch.randn(d, generator=g)
    c /= c.norm()
    l_dir -= (l_dir @ c) * c
    l_dir /= l_dir.norm()
    n = n_a + n_b
    base = torch.randn(n, d, generator=g)
    s = torch.tensor([1.0] * n_a + [-1.0] * n_b)[:, None]  # letter sign of the positive completion
    noise = 0.15
    pos = base + concept * c + s * letter * l_dir + noise * torch.randn(n, d, generator=g)
    neg = base - concept * c - s * letter * l_dir + noise * torch.randn(n, d, generator=g)
    pairs = [caa_pair(f"q{i}", "(A)" if i < n_a else "(B)", "(B)" if i < n_a else "(A)", id=str(i)) for i in range(n)]
    return pos, neg, pairs, c, l_dir


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_balanced_mean_diff_recovers_the_concept_despite_a_large_letter_direction():
    pos, neg, pairs, concept, letter = _lettered(n_a=30, n_b=10)
    groups = [p.balance_group for p in pairs]
    assert groups == ["A"] * 30 + ["B"] * 10
    naive = mean_diff(pos, neg)
    balanced = mean_diff(pos, neg, groups=groups)
    assert _cos(balanced, concept) > 0.9 and abs(_cos(balanced, letter)) < 0.1
    assert _cos(naive, concept) < 0.5 and _cos(naive, letter) > 0.8  # the letter dominates the plain mean
    # exactly the mean of the two groups' mean differences, whatever their sizes
    expected = ((pos[:30] - neg[:30]).double().mean(0) + (pos[30:] - neg[30:]).double().mean(0)) / 2
    torch.testing.assert_close(balanced.double(), expected, atol=1e-6, rtol=1e-6)
    # the other methods weigh the groups equally too
    assert abs(_cos(probe(pos, neg, groups=groups), letter)) < 0.05  # weighted, the letter tells pos from neg nothing
    assert float(pca(pos, neg, groups=groups) @ balanced) > 0


def test_quality_table_shows_a_letter_confounded_vector():
    from steering.vectors import VectorSet, quality_table

    pos, neg, pairs, concept, letter = _lettered(n_a=30, n_b=10, seed=1)
    groups = [p.balance_group for p in pairs]
    sets = {
        name: VectorSet("v", "m", "mean_diff", "answer", "none", 32, 40, "0" * 64, {5: vector})
        for name, vector in (("naive", mean_diff(pos, neg)), ("balanced", mean_diff(pos, neg, groups=groups)))
    }
    naive = quality_table(sets["naive"], {5: pos}, {5: neg}, pairs).iloc[0]
    good = quality_table(sets["balanced"], {5: pos}, {5: neg}, pairs).iloc[0]
    assert naive["letter_cosine"] > 0.8 and abs(good["letter_cosine"]) < 0.1
    assert naive["accuracy_A"] == 1.0 and naive["accuracy_B"] < 0.2 and naive["worst_group_accuracy"] < 0.2
    assert good["accuracy_A"] >= 0.9 and good["accuracy_B"] >= 0.9 and good["worst_group_accuracy"] >= 0.9
    rows = torch.cat([pos, neg])
    is_a = torch.tensor([True] * 30 + [False] * 10 + [False] * 30 + [True] * 10)  # positives then negatives
    hand = rows[is_a].double().mean(0) - rows[~is_a].double().mean(0)
    assert naive["letter_cosine"] == pytest.approx(_cos(sets["naive"][5], hand), abs=1e-9)
    plain = quality_table(sets["naive"], {5: pos}, {5: neg}).iloc[0]  # without pairs: no letter columns to fill
    assert np.isnan(plain["letter_cosine"]) and np.isnan(plain["worst_group_accuracy"])


def test_extract_balances_unequal_letter_groups_on_the_model(tiny):
    pairs = [p for p in _pairs(8) if p.positive_letter == "A"] + [p for p in _pairs(4) if p.positive_letter == "B"]
    assert [p.positive_letter for p in pairs] == ["A"] * 4 + ["B"] * 2
    balanced = extract(tiny, pairs, layers=[1, 2], normalize="none", progress=False)
    naive = extract(tiny, pairs, layers=[1, 2], normalize="none", progress=False, balance=False)
    pos, neg = collect_activations(tiny, pairs, [1, 2], progress=False)
    a = torch.tensor([p.positive_letter == "A" for p in pairs])
    table = layer_quality(tiny, balanced, pairs)
    naive_table = layer_quality(tiny, naive, pairs).set_index("layer")
    for layer in (1, 2):
        d = (pos[layer] - neg[layer]).double()
        torch.testing.assert_close(balanced[layer].double(), (d[a].mean(0) + d[~a].mean(0)) / 2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(naive[layer].double(), d.mean(0), atol=1e-5, rtol=1e-4)
        row = table.set_index("layer").loc[layer]
        is_a = torch.cat([a, ~a])  # answer letter of positives, then of negatives
        rows = torch.cat([pos[layer], neg[layer]]).double()
        letter = rows[is_a].mean(0) - rows[~is_a].mean(0)
        assert row["letter_cosine"] == pytest.approx(_cos(balanced[layer], letter), abs=1e-6)
        assert abs(row["letter_cosine"]) < abs(naive_table.loc[layer, "letter_cosine"])  # less letter in it
        expected_a = projection_quality(balanced[layer], pos[layer][a], neg[layer][a])["accuracy"]
        assert row["accuracy_A"] == expected_a and row["n_pairs"] == 6


def test_custom_method_without_groups_is_warned_and_unbalanced(tiny):
    def plain(pos, neg):
        return pos.mean(0) - neg.mean(0)

    with pytest.warns(UserWarning, match="not balanced over answer letters"):
        vs = extract(tiny, _pairs(3), layers=[1], method=plain, progress=False)
    assert vs.method == "plain"
