"""Driver readouts (projections read in the scoring forward) and the condition contrast, against references
computed with plain forward passes outside the scorer."""

from __future__ import annotations

import json

import pytest
import torch
from sweep_worker import tiny_model

from steering.compliance import BASELINE, PREFILL, Cell, Conversation, ForcedChoiceScorer, Readout, option_message
from steering.condition_vector import condition_vector
from steering.default_model import default_model_dir
from steering.questions import load_questions
from steering.scenario import load_setting
from steering.spec import DriverSpec, SweepSpec
from steering.sweep import run_sweep

VARIANT = "informative"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(str(default_model_dir()))


def prompt_text(model, conv: Conversation) -> str:
    messages = load_setting("animal_welfare").messages(
        option_message(conv.question, conv.order), conv.condition, VARIANT, scratchpad=False
    )
    return model.format_chat(messages) + PREFILL


def reference_last(model, conv: Conversation, layer: int, cell: Cell | None = None) -> torch.Tensor:
    """The residual [d] at the answer position from one whole-prompt forward, steered on the response if asked."""
    enc = model.encode([prompt_text(model, conv)])
    ivs = []
    if cell is not None and cell.vector is not None:
        ivs = [model.intervention(cell.layer, cell.vector, cell.absolute, positions="all")]
        # steer the assistant turn only, as the scorer does: explicit range from the header to the end
        start = model.chat_ids(
            load_setting("animal_welfare").messages(
                option_message(conv.question, conv.order), conv.condition, VARIANT, scratchpad=False
            ),
            suffix=PREFILL,
        )[1]
        ivs = [model.intervention(cell.layer, cell.vector, cell.absolute, positions=[(start, enc.input_ids.shape[1])])]
    with model.steer(ivs, enc.layout):
        return model.capture(enc, [layer], at="last")[layer][0]


def test_readout_matches_whole_prompt_projection(tiny):
    gen = torch.Generator().manual_seed(3)
    vecs = {
        "a": {1: torch.randn(64, generator=gen), 2: torch.randn(64, generator=gen)},
        "b": {2: torch.randn(64, generator=gen)},
    }
    readout = Readout.of_vectors(vecs, [1, 2])
    assert readout.labels == {1: ["a@1"], 2: ["a@2", "b@2"]}
    steer = torch.randn(64, generator=gen)
    cells = [BASELINE, Cell("s", 1, 2.0, steer), Cell("s", 2, -3.0, steer)]
    convs = [Conversation(q, c, o) for q in load_questions(n=2) for c in ("monitored", "unmonitored") for o in (0, 1)]
    scorer = ForcedChoiceScorer(tiny)
    for reuse in (True, False):
        out = list(scorer.score_conversations(VARIANT, convs, cells, reuse_prefix=reuse, readout=readout))
        for conv, _, reads in out:
            for i, cell in enumerate(cells):
                for layer in (1, 2):
                    want = readout.directions[layer] @ reference_last(tiny, conv, layer, cell)
                    torch.testing.assert_close(reads[layer][i], want, atol=1e-4, rtol=1e-4)
    # A readout never changes the scores.
    plain = [p for _, p, _ in scorer.score_conversations(VARIANT, convs, cells)]
    read = [p for _, p, _ in scorer.score_conversations(VARIANT, convs, cells, readout=readout)]
    assert all(torch.equal(torch.stack(a), torch.stack(b)) for a, b in zip(plain, read))


def test_readout_rows_average_the_two_orders(tiny):
    vecs = {"a": {1: torch.randn(64, generator=torch.Generator().manual_seed(4))}}
    readout = Readout.of_vectors(vecs, [1])
    q = load_questions(n=1)
    frame = ForcedChoiceScorer(tiny).score(q, VARIANT, readout=readout)
    unit = readout.directions[1][0]
    for row in frame.itertuples():
        convs = [Conversation(q[0], row.condition, o) for o in (0, 1)]
        want = sum(float(unit @ reference_last(tiny, c, 1)) for c in convs) / 2
        assert row.readout["a@1"] == pytest.approx(want, abs=1e-4)


def test_condition_vector_is_the_mean_difference(tiny):
    questions = load_questions(n=3)
    vs = condition_vector(tiny, questions, [0, 2], variant=VARIANT, normalize="none")
    for layer in (0, 2):
        mean = {}
        for condition in ("monitored", "unmonitored"):
            acts = [reference_last(tiny, Conversation(q, condition, o), layer) for q in questions for o in (0, 1)]
            mean[condition] = torch.stack(acts).mean(0)
        torch.testing.assert_close(vs[layer], mean["monitored"] - mean["unmonitored"], atol=1e-4, rtol=1e-4)
    assert vs.n_pairs == 6 and vs.driver == "condition"
    unit = condition_vector(tiny, questions, [2], variant=VARIANT)
    assert float(unit[2].norm()) == pytest.approx(1.0, abs=1e-5)


def test_sweep_stores_readouts_and_the_condition_driver(tiny, tmp_path):
    spec = SweepSpec(
        name="r",
        model="tiny-llama",
        drivers=[DriverSpec(name="cue", contrast="condition", n_pairs=2)],
        control_seeds=[0],
        layers=[1],
        coefficients=[0.0, 1.0],
        variants=[VARIANT],
        n_questions=2,
        store=str(tmp_path / "r.sqlite"),
    )
    rows = run_sweep(spec, model=tiny, progress=False)
    extras = [json.loads(e) for e in rows["extra"]]
    assert all(set(e["readout"]) == {"cue@1", "random-0@1"} for e in extras)
    cue = condition_vector(tiny, load_questions(n=2), [1], variant=VARIANT)
    unit = cue[1] / cue[1].norm()
    base = rows[(rows.driver == "none")]
    for row, extra in zip(base.itertuples(), [json.loads(e) for e in base["extra"]]):
        q = next(q for q in load_questions(n=2, seed=0) if q.id == row.question)
        convs = [Conversation(q, row.condition, o) for o in (0, 1)]
        want = sum(float(unit @ reference_last(tiny, c, 1)) for c in convs) / 2
        assert extra["readout"]["cue@1"] == pytest.approx(want, abs=1e-4)
    # The report plots every readout, the random control's too (it has no driver colour: grey).
    from steering.report import plot_readouts

    titles = [ax.get_title() for ax in plot_readouts(rows).axes if ax.get_visible()]
    assert [t.split()[0] for t in titles] == ["cue@1", "random-0@1"]


def test_driver_spec_contrast_rules():
    with pytest.raises(ValueError, match="exactly one of"):
        DriverSpec(name="x", dataset="values", contrast="condition")
    with pytest.raises(ValueError, match="contrast"):
        DriverSpec(name="x", contrast="letters")
    with pytest.raises(ValueError, match="'questions' applies"):
        DriverSpec(name="x", dataset="values", questions="animal_welfare")
    spec = SweepSpec(name="s", drivers=[DriverSpec(name="x", dataset="values")], layers=[1], coefficients=[1.0])
    assert "contrast" not in spec.to_dict()["drivers"][0]  # unset new keys keep old specs' hashes


def test_generation_readouts_match_a_teacher_forced_forward(tiny):
    chat = [{"role": "user", "content": "Tell me about hens."}]
    directions = {1: torch.randn(2, 64, generator=torch.Generator().manual_seed(5))}
    steer = [tiny.intervention(1, torch.ones(64), 0.5, positions="generated")]
    texts, ids, reads = tiny.generate_with_readouts([chat, chat[:1]], directions, 6, steer)
    assert texts == tiny.generate([chat, chat[:1]], 6, steer) and reads[1].shape == (2, 6, 2)
    prompt_ids, _ = tiny.chat_ids(chat)
    full = prompt_ids + ids[0][:-1]  # every new token but the last is fed back
    enc = tiny.encode([tiny.tokenizer.decode(full)])
    assert enc.input_ids[0].tolist() == full
    positions = [(len(prompt_ids), len(full))]
    ivs = [tiny.intervention(1, torch.ones(64), 0.5, positions=positions)]
    with tiny.steer(ivs, enc.layout):
        acts = tiny.capture(enc, [1], at=[list(range(len(prompt_ids), len(full)))])[1][0]  # [5, d]
    torch.testing.assert_close(reads[1][0, :5], acts @ directions[1].T, atol=1e-4, rtol=1e-4)
    assert reads[1][0, 5].isnan().all()  # the last token is never fed back: no residual to read


def test_scratchpad_span_and_means():
    from transformers import AutoTokenizer

    from steering.readouts import scratchpad_means, scratchpad_span

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    text = "<SCRATCHPAD_REASONING>I am on the free tier.</SCRATCHPAD_REASONING>\n<OUTPUT>Fine.</OUTPUT>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start, end = scratchpad_span(tok, ids)
    assert tok.decode(ids[start:end]) == "I am on the free tier."
    unclosed = tok("<SCRATCHPAD_REASONING>Still thinking", add_special_tokens=False)["input_ids"]
    s2, e2 = scratchpad_span(tok, unclosed)
    assert tok.decode(unclosed[s2:e2]) == "Still thinking" and e2 == len(unclosed)
    assert scratchpad_span(tok, tok("<OUTPUT>No reasoning.</OUTPUT>")["input_ids"]) is None
    reads = {3: torch.arange(len(ids) * 2, dtype=torch.float32).view(1, len(ids), 2)}
    means = scratchpad_means(tok, [ids], reads, {3: ["a@3", "b@3"]})[0]
    assert means["a@3"] == pytest.approx(float(reads[3][0, start:end, 0].mean()))
    assert scratchpad_means(tok, [tok("no tags")["input_ids"]], reads, {3: ["a@3", "b@3"]}) == [{}]
