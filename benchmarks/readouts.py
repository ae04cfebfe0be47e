"""Driver readouts: what reading every driver direction at the answer position adds to a forced-choice sweep.

The same scoring work twice per round, alternating: `ForcedChoiceScorer.score_conversations` over the quickstart
grid's cells, once plain and once with a `Readout` of every (driver, layer) direction of the grid, which is what a
sweep stores per row. The readout is read in the scoring forward pass (hooks after the steering hooks), so the
overhead is a [rows, d] x [d, k] product per read layer and one host copy per pass.
"""

from __future__ import annotations

import time

try:
    import common
except ImportError:  # imported as benchmarks.readouts
    from benchmarks import common

DRIVERS = ("values", "goal_guarding", "sycophancy", "random-0")
LAYERS = (9, 15)
COEFFICIENTS = (-0.5, -0.25, 0.25, 0.5)
SEED = 7


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    title = "Driver readouts overhead (readouts.py)"
    command = common.command_line("readouts.py", args)
    import steering
    from steering.compliance import BASELINE, Cell, Conversation, ForcedChoiceScorer, Readout
    from steering.questions import load_questions

    model = steering.load_model("default")
    scorer = ForcedChoiceScorer(model)
    norms = model.residual_norms()
    vectors = {name: {layer: common.random_unit(model.d_model, SEED + d) for layer in LAYERS} for d, name in
               enumerate(DRIVERS)}  # fmt: skip
    cells = [BASELINE]
    for name, per_layer in vectors.items():
        cells += [Cell(name, layer, c, per_layer[layer], float(norms[layer])) for layer in LAYERS for c in COEFFICIENTS]
    readout = Readout.of_vectors(vectors, LAYERS)
    n_questions = 1 if args.quick else 2
    convs = [Conversation(q, c, o) for q in load_questions(n=n_questions) for c in ("monitored", "unmonitored")
             for o in (0, 1)]  # fmt: skip
    results: dict = {}

    def side(name: str, with_readout: bool):
        def run():
            out = scorer.score_conversations("base", convs, cells, readout=readout if with_readout else None)
            results[name] = [probs for _, probs, _ in out]

        return run

    sides = {"scoring": side("scoring", False), "scoring + readouts": side("scoring + readouts", True)}
    for fn in sides.values():  # warm-up, untimed
        fn()
    common.log(f"readouts: {len(convs)} conversations x {len(cells)} cells, {args.repeats} rounds")
    times = common.alternate(sides, args.repeats, warmup=0, log=common.log)
    rows = []
    for name, t in times.items():
        rows.append([name, f"{sorted(t)[len(t) // 2]:.2f}"])
    ratios = [b / a for a, b in zip(times["scoring"], times["scoring + readouts"])]
    spread = common.Spread.of([100 * (r - 1) for r in ratios])
    same = all(
        bool((a == b).all())
        for ca, cb in zip(results["scoring"], results["scoring + readouts"])
        for a, b in zip(ca, cb)
    )
    notes = [
        f"readouts: {sum(len(v) for v in readout.labels.values())} directions ({len(DRIVERS)} drivers x layers "
        f"{', '.join(map(str, LAYERS))}) read at the answer position of every row",
        f"the letter probabilities with and without readouts are {'bit-identical' if same else 'DIFFERENT'}",
        "overhead = time with readouts / time without, per round, minus 1 (min / median / max over rounds)",
    ]
    section = common.Section(
        title=title,
        command=command,
        machine=info,
        sizes=f"{len(convs)} conversations x {len(cells)} cells per round; {args.repeats} timed rounds after a warm-up",
        headers=["side", "seconds per round (median)"],
        rows=rows + [["overhead, % (min / median / max)", " / ".join(f"{v:+.1f}" for v in (spread.low, spread.mid,
                                                                                            spread.high))]],
        notes=notes,
        headline=f"readouts add {spread.mid:+.1f}% to forced-choice scoring (median; goal <= 5%)",
    )  # fmt: skip
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
