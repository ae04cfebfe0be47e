"""SteeringModel: encoding and layouts, norm-relative coefficients, errors, and end to end on the default model."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from steering import SteeringModel

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from sweep_worker import tiny_model

    from steering.default_model import default_model_dir

    return tiny_model(str(default_model_dir()), max_positions=128, name="tiny")


def test_encode_layout_marks_prompt_and_assistant_header(tiny):
    short = [{"role": "user", "content": "Hi"}]
    enc = tiny.encode([CHAT, short])
    shorter = int(enc.layout.prompt_len.argmin())
    assert enc.layout.prompt_len[0] != enc.layout.prompt_len[1] and enc.attention_mask[shorter, 0] == 0  # left pad
    for b, conv in enumerate([CHAT, short]):
        n = int(enc.layout.prompt_len[b])
        row = enc.input_ids[b, enc.attention_mask[b].bool()]
        assert len(row) == n
        start = int(enc.layout.response_start[b])
        header = tiny.tokenizer.decode(row[start:])
        assert header.startswith("<|im_start|>assistant")
        assert tiny.tokenizer.decode(row[:start]) == tiny.format_chat(conv, add_generation_prompt=False)
    right = tiny.encode([CHAT, short], padding_side="right")
    assert torch.equal(right.layout.prompt_len, enc.layout.prompt_len)


def test_plain_strings_have_no_response_start_and_response_mode_says_why(tiny):
    enc = tiny.encode(["just text", "more plain text here"])
    assert enc.layout.response_start is None
    iv = tiny.intervention(1, torch.ones(64), 1.0, positions="response")
    with pytest.raises(ValueError, match="assistant turn"), tiny.steer([iv], enc.layout):
        pass


def test_no_chat_template_is_a_clear_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    model = SteeringModel(build_tiny("llama"), tok)
    with pytest.raises(ValueError, match="no chat template"):
        model.encode([CHAT])


def test_relative_coefficient_scales_by_residual_norm(tiny):
    norms = tiny.residual_norms()
    assert norms.shape == (3,) and bool((norms > 0).all())
    vec = torch.randn(64)
    iv = tiny.intervention(2, vec, 0.5, relative=True)
    added = iv.coefficient * vec.norm()
    assert float(added) == pytest.approx(0.5 * float(norms[2]), rel=1e-5)
    per_row = tiny.intervention(2, vec, [0.5, 1.0], relative=True)
    torch.testing.assert_close(per_row.coefficient[1] / per_row.coefficient[0], torch.tensor(2.0))


def test_prompt_longer_than_context_fails_before_compute(tiny):
    long = " ".join(["word"] * 200)
    with pytest.raises(ValueError, match="takes at most 128"):
        tiny.generate([long], max_new_tokens=2)


def test_generate_steered_differs_and_zero_is_identical(tiny):
    plain = tiny.generate([CHAT], max_new_tokens=6)
    zero = tiny.generate([CHAT], max_new_tokens=6, interventions=[tiny.intervention(1, torch.ones(64), 0.0)])
    assert plain == zero
    strong = tiny.intervention(1, torch.randn(64, generator=torch.Generator().manual_seed(3)) * 50, 1.0)
    assert tiny.generate([CHAT], max_new_tokens=6, interventions=[strong]) != plain


@pytest.mark.slow
def test_default_model_end_to_end(default_model):
    model = default_model
    assert (model.n_layers, model.d_model) == (30, 576)
    question = [{"role": "user", "content": "What do you think about chicken farms?"}]
    enc = model.encode([question])
    layer = 15
    pos = model.capture(["I love animals and protect them from harm."], [layer])[layer][0]
    neg = model.capture(["Animals are products and their pain is irrelevant."], [layer])[layer][0]
    vector = (pos - neg) / (pos - neg).norm()

    def next_token_probs(ivs):
        with model.steer(ivs, enc.layout), torch.no_grad():
            return model.model(**enc.inputs).logits[0, -1].softmax(-1)

    plain = next_token_probs([])
    assert torch.equal(next_token_probs([model.intervention(layer, vector, 0.0)]), plain)
    steered = next_token_probs([model.intervention(layer, vector, 0.8, positions="response", relative=True)])
    assert (steered - plain).abs().sum() > 0.05  # total variation well above float noise
    text_plain = model.generate([question], max_new_tokens=24)
    assert (
        model.generate([question], max_new_tokens=24, interventions=[model.intervention(layer, vector, 0.0)])
        == text_plain
    )
    steer_gen = model.intervention(layer, vector, 0.8, positions="generated", relative=True)
    assert model.generate([question], max_new_tokens=24, interventions=[steer_gen]) != text_plain
