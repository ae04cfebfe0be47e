"""Steered greedy generation per backend (TransformerLens, nnsight) against plain transformers, in one run.

The work: the same chat prompt, vector, layer, coefficient and positions (`generated`) on the default model;
each side generates the same number of tokens. Ratio = backend tokens/s / hf tokens/s for the same round.
"""

from __future__ import annotations

import time

try:
    import common
except ImportError:  # imported as benchmarks.backends
    from benchmarks import common

LAYER = 15
PROMPT = [{"role": "user", "content": "What do you think about chicken farms?"}]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    import steering

    new = 8 if args.quick else 32
    models = {name: steering.load_model("default", backend=name) for name in ("hf", "transformer_lens", "nnsight")}
    hf = models["hf"]
    vector = common.random_unit(hf.d_model, 7)
    outputs: dict[str, list[str]] = {}

    def side(name: str):
        model = models[name]
        iv = model.intervention(LAYER, vector, 0.3, positions="generated", relative=True)

        def run():
            outputs[name] = model.generate([PROMPT], max_new_tokens=new, interventions=[iv])

        return run

    sides = {name: side(name) for name in models}
    times = common.alternate(sides, args.repeats, warmup=1, log=common.log)
    rows = []
    headline = []
    for name, t in times.items():
        tok_s = new / sorted(t)[len(t) // 2]
        ratio = common.Spread.of(common.speed_ratios(t, times["hf"]))
        rows.append([name, f"{tok_s:.1f}", *ratio.cells(3), "same" if outputs[name] == outputs["hf"] else "differs"])
        if name != "hf":
            headline.append(f"{name} {ratio.mid:.2f}x")
    section = common.Section(
        "Steered generation per backend (backends.py)",
        common.command_line("backends.py", args),
        machine=info,
        sizes=f"batch 1, {new} new greedy tokens, layer {LAYER}, coefficient 0.3 x residual norm on generated tokens; "
        f"{args.repeats} timed rounds after a warm-up",
        headers=["backend", "tokens/s (median)", "vs hf: min", "median", "max", "text vs hf"],
        rows=rows,
        headline="steered tokens/s vs plain transformers: " + ", ".join(headline),
        notes=["ratio = hf time / backend time for the same round (> 1 means faster than hf)"],
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
