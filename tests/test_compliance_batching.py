"""Forced-choice scoring batched over several conversations: same numbers and same steered tokens as one at a time."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from sweep_worker import tiny_model

from steering import SteeringModel
from steering.compliance import (
    BASELINE,
    Cell,
    Conversation,
    ForcedChoiceScorer,
    Group,
    padding_is_exact,
    plan_groups,
)
from steering.default_model import default_model_dir
from steering.questions import load_questions

TOKENIZER = str(default_model_dir())
VARIANT = "informative"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(TOKENIZER)


def _tiny_arch(arch: str) -> SteeringModel:
    """A tiny random model of ``arch`` with the default model's tokenizer (vocabulary and chat template)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    if arch == "gpt2":  # absolute position embeddings: padded rows must keep their own positions
        config = tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=2048)
    else:  # sliding-window attention narrower than the prompt: padding would move the window
        config = tf.MistralConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            sliding_window=16,
        )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return SteeringModel(model, tok, name=f"tiny-{arch}")


def _conversations(n_questions: int = 3) -> list[Conversation]:
    qs = load_questions(n=n_questions)
    return [Conversation(q, c, order) for q in qs for c in ("monitored", "unmonitored") for order in (0, 1)]


def _cells() -> list[Cell]:
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2))
    return [
        BASELINE,
        Cell("v", 1, 2.0, vec),
        Cell("v", 1, 0.0, vec),
        Cell("v", 2, -3.0, vec),
        Cell("w", 1, 1.0, -vec),
        Cell("v", 0, 0.5, vec, scale=4.0),
    ]


class ForwardCounter:
    """Counts forward calls of the whole model (one per pass)."""

    def __init__(self, model: SteeringModel):
        self.model, self.calls = model, 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.model.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _score(scorer, convs, cells, **kwargs) -> list[torch.Tensor]:
    """[conversations, cells, 2] letter probabilities, checking the conversations come back in input order."""
    out = list(scorer.score_conversations(VARIANT, convs, cells, **kwargs))
    assert [conv for conv, *_ in out] == list(convs)
    return torch.stack([torch.stack(probs) for _, probs, _ in out])


def assert_same_scores(a: torch.Tensor, b: torch.Tensor) -> None:
    """Letter probabilities [..., 2] agree: the compliance shares within 1e-5, the raw probabilities (tiny on a
    random model's 49k vocabulary) within 1e-4 relative."""
    torch.testing.assert_close(a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(a, b, atol=0, rtol=1e-4)


def _user_lengths(scorer, convs) -> set[int]:
    ids, starts = scorer.tokenize(VARIANT, convs)
    shared = scorer.shared_prefix(ids, min(starts) - 1)
    return {start - shared for start in starts}


@pytest.mark.parametrize("reuse", [True, False])
def test_batching_several_conversations_equals_one_at_a_time(tiny, reuse):
    scorer, convs, cells = ForcedChoiceScorer(tiny), _conversations(), _cells()
    assert len(_user_lengths(scorer, convs)) > 1  # the batch needs padding between conversations
    with ForwardCounter(tiny) as alone:  # max_batch_tokens=1: one conversation per pass, as before batching
        one = _score(scorer, convs, cells, reuse_prefix=reuse, batch_size=32, max_batch_tokens=1)
    with ForwardCounter(tiny) as together:
        batched = _score(scorer, convs, cells, reuse_prefix=reuse, max_batch_tokens=10**8)
    assert_same_scores(batched, one)
    share = one[..., 0] / one.sum(-1)
    assert float((share[:, 1] - share[:, 0]).abs().max()) > 1e-3  # steering moved the scores
    assert together.calls < alone.calls
    assert together.calls == (3 if reuse else 1)  # system prompt, user turns, every cell / one pass


def test_batched_scores_equal_the_score_frame_one_at_a_time(tiny):
    scorer, qs = ForcedChoiceScorer(tiny), load_questions(n=2)
    cells = _cells()
    a = scorer.score(qs, VARIANT, cells=cells, max_batch_tokens=10**8)
    b = scorer.score(qs, VARIANT, cells=cells, batch_size=3, max_batch_tokens=1)
    assert list(a.question) == list(b.question) and list(a.driver) == list(b.driver)
    assert float((a.compliance - b.compliance).abs().max()) < 1e-5
    assert float((a.letter_mass - b.letter_mass).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "mistral_sliding"])
def test_batching_is_exact_for_absolute_positions_and_sliding_windows(arch):
    model = _tiny_arch(arch)
    scorer, convs, cells = ForcedChoiceScorer(model), _conversations(2), _cells()
    assert padding_is_exact(model, 4096) == (arch == "gpt2")
    one = _score(scorer, convs, cells, batch_size=32, max_batch_tokens=1)
    batched = _score(scorer, convs, cells, max_batch_tokens=10**8)
    full = _score(scorer, convs, cells, reuse_prefix=False, batch_size=32, max_batch_tokens=1)  # no KV cache
    assert_same_scores(batched, one)
    assert_same_scores(one, full)


# ---- which tokens steering touches ------------------------------------------------------------------------------
@contextmanager
def record_steered(model: SteeringModel, layer: int):
    """Per steered forward pass: for each row, the row positions whose residual stream at ``layer`` the steering
    hooks changed, measured from outside (block output before vs after the steering hooks). Row positions come from
    the 2-D attention mask of the call (index among the row's real tokens; padding -1)."""
    block, state, records = model.layers[layer], {}, []

    def remember(module, args, kwargs):
        state["mask"], state["width"] = kwargs["attention_mask"], kwargs["input_ids"].shape[1]

    def before(module, args, output):
        state["before"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    def after(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        changed = (hidden != state["before"]).any(-1)
        mask = state["mask"].long()
        pos = (mask.cumsum(-1) - 1)[:, -state["width"] :]
        pos = torch.where(mask[:, -state["width"] :].bool(), pos, torch.full_like(pos, -1))
        assert not bool((changed & (pos < 0)).any()), "steering changed a padding slot"
        records.append([set(pos[b][changed[b]].tolist()) for b in range(pos.shape[0])])

    handles = [
        model.model.register_forward_pre_hook(remember, with_kwargs=True),
        block.register_forward_hook(before, prepend=True),
    ]
    original = model.steer

    @contextmanager
    def spy(interventions, layout=None):
        with original(interventions, layout) as tracker:
            handle = block.register_forward_hook(after)  # after the steering hooks of this context
            try:
                yield tracker
            finally:
                handle.remove()

    model.steer = spy
    try:
        yield records
    finally:
        del model.steer
        for handle in handles:
            handle.remove()


def test_response_steering_touches_exactly_the_suffix_tokens(tiny):
    scorer, convs, cells = ForcedChoiceScorer(tiny), _conversations(2), _cells()
    ids, starts = scorer.tokenize(VARIANT, convs)
    steered_here = [c.vector is not None and c.layer == 1 and c.absolute != 0 for c in cells]
    expected = [
        set(range(start, len(row))) if hit else set() for row, start in zip(ids, starts) for hit in steered_here
    ]
    touched = {}
    for name, kwargs in {"one at a time": dict(batch_size=32, max_batch_tokens=1), "batched": {}}.items():
        kwargs.setdefault("max_batch_tokens", 10**8)
        with record_steered(tiny, 1) as records:
            _score(scorer, convs, cells, positions="response", **kwargs)
        touched[name] = [rows for record in records for rows in record]  # conversation-major, cells in order
        assert len(records) == (len(convs) if name == "one at a time" else 1)
    assert touched["one at a time"] == expected
    assert touched["batched"] == expected


# ---- the plan ------------------------------------------------------------------------------------------------------
def test_plan_groups_fills_the_token_budget_in_order():
    ids = [[0] * n for n in (100, 102, 101, 100, 130)]
    starts = [n - 5 for n in (100, 102, 101, 100, 130)]
    # shared prefix 80: tokens per row = 80 + longest user turn + longest suffix (5)
    groups = plan_groups(ids, starts, 80, n_cells=10, budget=3 * 10 * 102, batch_size=None)
    assert groups == [Group([0, 1, 2], 10), Group([3, 4], 10)]  # 3 x 10 rows x 102 tokens; 2 x 10 x 130
    # a budget below one conversation's cells: one conversation per group, cells split evenly
    small = plan_groups(ids, starts, 80, n_cells=10, budget=4 * 100, batch_size=None)
    assert [g.conversations for g in small] == [[0], [1], [2], [3], [4]]
    assert [g.cells for g in small] == [4, 3, 3, 4, 3]  # 400 // 100 = 4 cells -> 4+3+3; 400 // 102 = 3 -> 3+3+3+1
    # batch_size fixes the cells per pass (the rows of one conversation, as before)
    fixed = plan_groups(ids, starts, 80, n_cells=10, budget=1, batch_size=3)
    assert [g.cells for g in fixed] == [3] * 5 and len(fixed) == 5
    # whole prompts: a token costs more, and without exact padding only equal lengths share a group
    exact = plan_groups(ids, starts, None, n_cells=1, budget=10**6, pads_exact=False)
    assert [g.conversations for g in exact] == [[0], [1], [2], [3], [4]]
    same = plan_groups([[0] * 50] * 3, [45] * 3, 40, n_cells=2, budget=10**6, pads_exact=False)
    assert same == [Group([0, 1, 2], 2)]


def test_no_cells_yield_empty_lists(tiny):
    scorer, convs = ForcedChoiceScorer(tiny), _conversations(1)
    for reuse in (True, False):
        out = list(scorer.score_conversations(VARIANT, convs, [], reuse_prefix=reuse))
        assert out == [(conv, [], {}) for conv in convs]
