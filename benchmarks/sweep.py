"""Sweep scoring speed: ours (`ForcedChoiceScorer`, cells batched, shared prefix reused) vs a per-cell loop.

The work: forced-choice compliance of a few conversations (one question, its two option orders) under the
quickstart grid's cells (4 directions x 2 layers x 6 coefficients, plus the unsteered baseline), steering
the assistant turn only. The loop is what a user of a peer library writes: one full forward pass per conversation
and cell with the vector applied from the assistant turn on (steering-vectors' `apply(min_token_index=...)`, or a
plain forward hook when steering-vectors is not installed). Ours is the sweep executor's scorer.
"""

from __future__ import annotations

import statistics
import time

import torch

try:
    import common
except ImportError:  # imported as benchmarks.sweep
    from benchmarks import common

DRIVERS = ("values", "goal_guarding", "sycophancy", "random-0")
LAYERS = (9, 15)
COEFFICIENTS = (-0.5, -0.25, -0.1, 0.1, 0.25, 0.5)  # relative: x the layer's mean residual norm
SEED = 99


def loop_side(model, scorer, cells, ids, starts, results: dict):
    """One full forward per conversation x cell, the vector added from the assistant turn on."""
    hf = model.model
    sv, _ = common.load_steering_vectors()

    def run():
        out = []
        with torch.no_grad():
            for row, start in zip(ids, starts):
                x = torch.tensor([row])
                probs = []
                for cell in cells:
                    if cell.vector is None:
                        logits = hf(input_ids=x).logits[:, -1]
                    elif sv is not None:
                        vector = sv.SteeringVector(layer_activations={cell.layer: cell.vector.float()})
                        with vector.apply(hf, multiplier=cell.absolute, min_token_index=start):
                            logits = hf(input_ids=x).logits[:, -1]
                    else:
                        handle = common.add_from(model.layers[cell.layer], cell.absolute * cell.vector.float(), start)
                        try:
                            logits = hf(input_ids=x).logits[:, -1]
                        finally:
                            handle.remove()
                    probs.append(logits.float().softmax(-1)[0, scorer.letter_ids])
                out.append(probs)
        results["loop"] = out

    return run, ("steering-vectors loop" if sv is not None else "plain-hook loop")


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--with-no-reuse", action="store_true", help="also time ours without prefix reuse (slow)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    args.repeats = min(args.repeats, 2)  # the loop side runs ~100 full forwards per round
    common.ensure_steering_importable()
    title = "Sweep scoring speed (sweep.py)"
    command = common.command_line("sweep.py", args)
    try:
        from steering.compliance import BASELINE, Cell, Conversation, ForcedChoiceScorer
        from steering.questions import load_questions
    except ImportError as exc:
        common.emit(
            common.Section(title, command, machine=info, status=f"pending: the sweep scorer ({exc})"), args, started
        )
        return
    import steering

    model = steering.load_model("default")
    scorer = ForcedChoiceScorer(model)
    # The quickstart grid's shape: 3 drivers + 1 control, 2 layers, 6 coefficients (speed does not depend on
    # which directions they are, so each driver is a fixed random direction); --quick keeps 1 driver, 1 layer.
    drivers = DRIVERS[:1] if args.quick else DRIVERS
    layers = LAYERS[:1] if args.quick else LAYERS
    coefficients = COEFFICIENTS[:2] if args.quick else COEFFICIENTS
    norms = model.residual_norms()
    cells = [BASELINE]
    for d, name in enumerate(drivers):
        unit = common.random_unit(model.d_model, SEED + d)
        cells += [Cell(name, layer, c, unit, float(norms[layer])) for layer in layers for c in coefficients]
    question = load_questions(n=1)[0]
    convs = [Conversation(question, "monitored", order) for order in (0, 1)]
    ids, starts = scorer.tokenize("base", convs)
    results: dict = {}

    def build(convs, cells, ids, starts, results):
        def ours(reuse: bool):
            def run():
                out = scorer.score_conversations("base", convs, cells, "response", reuse_prefix=reuse, batch_size=32)
                results["reuse" if reuse else "no reuse"] = [probs for _, probs, _ in out]

            return run

        loop, loop_name = loop_side(model, scorer, cells, ids, starts, results)
        sides = {loop_name: loop, "ours": ours(True)}
        if args.with_no_reuse:
            sides["ours, no prefix reuse"] = ours(False)
        return sides, loop_name

    warm, _ = build(convs[:1], cells[:2], ids[:1], starts[:1], {})
    for fn in warm.values():  # warm-up on one conversation and two cells, untimed
        fn()
    sides, loop_name = build(convs, cells, ids, starts, results)
    common.log(f"sweep: {len(convs)} conversations x {len(cells)} cells, {len(sides)} sides x {args.repeats} rounds")
    cpu: dict[str, list[float]] = {}
    times = common.alternate(sides, args.repeats, warmup=0, log=common.log, cpu=cpu)
    scored = len(convs) * len(cells)
    rows, headline = [], []
    for name, t in times.items():
        per_s = scored / sorted(t)[len(t) // 2]
        if name == loop_name:
            rows.append([name, f"{per_s:.2f}", "1", "1", "1", "1"])
            continue
        ratio = common.Spread.of(common.speed_ratios(t, times[loop_name]))
        cpu_mid = statistics.median(common.speed_ratios(cpu[name], cpu[loop_name]))
        rows.append([name, f"{per_s:.2f}", *ratio.cells(2), f"{cpu_mid:.2f}"])
        headline.append(f"{name} {ratio.mid:.1f}x")
    worst = max(
        float((a - b).abs().max())
        for key in ("reuse", "no reuse")
        if key in results
        for conv_a, conv_b in zip(results[key], results["loop"])
        for a, b in zip(conv_a, conv_b)
    )
    notes = [
        f"parity: the letter probabilities of every side agree with the loop within {worst:.2e} (max abs)",
        f"work: question '{question.id}', condition monitored, both option orders ({len(ids[0])} tokens each, "
        f"assistant turn from token {starts[0]}); cells = unsteered + {len(drivers)} drivers x layers "
        f"{', '.join(map(str, layers))} x coefficients {', '.join(map(str, coefficients))} of the layer's mean "
        "residual norm (the quickstart grid's shape); steering on the assistant turn only",
        "ours = `ForcedChoiceScorer.score_conversations(..., positions='response')`: the system prompt prefilled "
        "once, each user turn once on top, then one batch row per cell over the few assistant tokens "
        "(`--with-no-reuse` adds a side that batches the cells over full prompts instead)",
        "ratio = loop time / our time for the same round (conversation-cells per second, ours over the loop)",
    ]
    section = common.Section(
        title=title,
        command=command,
        machine=info,
        sizes=f"{len(convs)} conversations x {len(cells)} cells = {scored} scores per round; {args.repeats} timed "
        "rounds after an untimed warm-up",
        headers=["side", "scores/s (median)", "vs the loop: min", "median", "max", "median, CPU time"],
        rows=rows,
        notes=notes,
        headline="scores/s vs a per-cell loop: " + ", ".join(headline),
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
