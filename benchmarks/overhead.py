"""Steering overhead during greedy generation: steered / unsteered tokens/s, ours vs steering-vectors vs repeng.

Every side runs the same ``generate`` call (same prompts, ``min_new_tokens = max_new_tokens`` so every side makes
the same number of tokens) with the same vector at the same layer(s); only how the vector gets added differs.
"""

from __future__ import annotations

import statistics
import time

import torch

try:
    import common
except ImportError:  # imported as benchmarks.overhead
    from benchmarks import common

PROMPTS = (
    "What do chickens need to live well on a farm?",
    "Explain in two sentences why pigs are considered intelligent.",
    "A neighbour keeps rabbits in a small hutch all year. Is that a problem?",
    "Summarise the main arguments for and against cage-free egg policies.",
    "How should a small dairy farm handle male calves?",
    "What is the difference between free-range and pasture-raised?",
    "Write a short note to a farmer about improving conditions for broiler chickens.",
    "Do fish feel pain? Answer briefly.",
)
ONE_LAYER = 15
SCALE = 0.3  # added vector norm as a fraction of the layer's mean residual norm
SEED = 1234


def build_sides(model, enc, vectors: dict[int, torch.Tensor], new_tokens: int, notes: list[str]) -> dict:
    """name -> zero-argument callable that runs one generate call (or returns its own timed seconds)."""
    hf = model.model
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    layer_sets = {"1 layer": [ONE_LAYER], "all layers": list(range(model.n_layers))}

    def generate():
        with torch.no_grad():
            return hf.generate(**enc.inputs, **kwargs)

    sides = {"unsteered": generate}
    for label, layers in layer_sets.items():
        ivs = [model.intervention(layer, vectors[layer], 1.0, positions="generated") for layer in layers]

        def ours(ivs=ivs):
            with model.steer(ivs, enc.layout):
                return generate()

        sides[f"ours, {label}"] = ours

    sv, why = common.load_steering_vectors()
    if sv is None:
        notes.append(f"steering-vectors: {why}")
    else:
        for label, layers in layer_sets.items():
            vector = sv.SteeringVector(layer_activations={layer: vectors[layer] for layer in layers})

            def peer_sv(vector=vector):
                with vector.apply(hf):
                    return generate()

            sides[f"steering-vectors, {label}"] = peer_sv

    rp, why = common.load_repeng()
    if rp is None:
        notes.append(f"repeng: {why}")
    else:
        for label, layers in layer_sets.items():
            control = rp.ControlVector(
                model_type=hf.config.model_type, directions={layer: vectors[layer].numpy() for layer in layers}
            )

            def peer_repeng(control=control, layers=layers):
                # ControlModel swaps the decoder blocks for wrappers; unwrap puts them back (both timed, both cheap).
                wrapped = rp.ControlModel(hf, layers)
                wrapped.set_control(control, 1.0)
                with torch.no_grad():
                    wrapped.generate(**enc.inputs, **kwargs)
                wrapped.reset()
                wrapped.unwrap()

            sides[f"repeng, {label}"] = peer_repeng
    return sides


def parity_check(model, enc, vectors: dict[int, torch.Tensor], new_tokens: int) -> str:
    """Untimed: ours with positions="all" must produce the same greedy tokens as the peers (which steer every
    token), proving every side adds the same vector at the same layer."""
    hf = model.model
    kwargs = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        with model.steer(model.intervention(ONE_LAYER, vectors[ONE_LAYER], 1.0, positions="all")):
            ours = hf.generate(**enc.inputs, **kwargs)
        plain = hf.generate(**enc.inputs, **kwargs)
        results = {}
        sv, _ = common.load_steering_vectors()
        if sv is not None:
            with sv.SteeringVector(layer_activations={ONE_LAYER: vectors[ONE_LAYER]}).apply(hf):
                results["steering-vectors"] = hf.generate(**enc.inputs, **kwargs)
        rp, _ = common.load_repeng()
        if rp is not None:
            wrapped = rp.ControlModel(hf, [ONE_LAYER])
            wrapped.set_control(rp.ControlVector(hf.config.model_type, {ONE_LAYER: vectors[ONE_LAYER].numpy()}))
            results["repeng"] = wrapped.generate(**enc.inputs, **kwargs)
            wrapped.reset()
            wrapped.unwrap()
    same = [name for name, out in results.items() if torch.equal(out, ours)]
    differ = [name for name in results if name not in same]
    changed = "changes" if not torch.equal(plain, ours) else "does NOT change"
    text = f"parity check (batch {enc.input_ids.shape[0]}, layer {ONE_LAYER}, {new_tokens} tokens, all positions): "
    text += f"the vector {changed} the greedy output; "
    text += f"identical tokens to ours: {', '.join(same) or 'none'}"
    return text + (f"; different: {', '.join(differ)}" if differ else "")


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per call (default 64, quick 8)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    import steering

    new_tokens = args.tokens or (8 if args.quick else 64)
    batches = [int(b) for b in (args.batches or "1,8").split(",")]
    model = steering.load_model("default")
    norms = model.residual_norms()
    vectors = {
        layer: common.random_unit(model.d_model, SEED + layer) * SCALE * float(norms[layer])
        for layer in range(model.n_layers)
    }
    notes: list[str] = []
    rows, headline = [], []
    for batch in batches:
        enc = model.encode([[{"role": "user", "content": text}] for text in PROMPTS[:batch]])
        sides = build_sides(model, enc, vectors, new_tokens, notes)
        warm = build_sides(model, enc, vectors, 2, [])  # warm-up: every side once, 2 tokens, untimed
        for fn in warm.values():
            fn()
        common.log(f"overhead: batch {batch}, {len(sides)} sides x {args.repeats} rounds, {new_tokens} tokens")
        cpu: dict[str, list[float]] = {}
        times = common.alternate(sides, args.repeats, warmup=0, log=common.log, cpu=cpu)
        base = times["unsteered"]
        made = batch * new_tokens
        for name, t in times.items():
            library, _, layers = name.partition(", ")
            vs_plain = common.Spread.of(common.speed_ratios(t, base))
            ours_key = f"ours, {layers}"
            if name == "unsteered":
                ratio_cells, goal, ours_vs = ["1", "1", "1", "1"], "", ""
            else:
                cpu_mid = statistics.median(common.speed_ratios(cpu[name], cpu["unsteered"]))
                ratio_cells = [*vs_plain.cells(), f"{cpu_mid:.3f}"]
                goal = common.verdict(vs_plain, 0.98) if library == "ours" else ""
                versus = common.speed_ratios(times[ours_key], t)
                ours_vs = "" if library == "ours" else f"{statistics.median(versus):.3f}"
            tok_s = made / sorted(t)[len(t) // 2]
            if library == "ours":
                headline.append(f"b{batch} {layers} {vs_plain.mid:.3f}")
            rows.append([batch, layers or "-", library, f"{tok_s:.1f}", *ratio_cells, ours_vs, goal])
        common.log(f"overhead: batch {batch} done")
    enc1 = model.encode([[{"role": "user", "content": PROMPTS[0]}]])
    lengths = [len(model.encode([[{"role": "user", "content": text}]]).input_ids[0]) for text in PROMPTS]
    notes.insert(0, parity_check(model, enc1, vectors, min(new_tokens, 16)))
    notes += [
        f"vector: a fixed random direction per layer (seed {SEED}+layer) scaled to {SCALE} x that layer's mean "
        f"residual norm; '1 layer' = layer {ONE_LAYER}, 'all layers' = 0..{model.n_layers - 1}",
        "ours steers generated tokens only (positions='generated', the study's setting, KV-cache correct); "
        "steering-vectors (`SteeringVector.apply`, min_token_index=0) and repeng (`ControlModel` + `set_control`) "
        "steer every token, since neither can restrict to generated tokens under a KV cache: the prompt pass "
        "differs, the per-token work of each hook is a few element-wise ops on every side",
        "repeng's time includes wrapping and unwrapping the blocks (`ControlModel(...)`, `set_control`, `unwrap`); "
        "ours and steering-vectors include registering and removing their hooks",
        "'median, CPU time' = the same ratio on this process's CPU seconds (time.process_time): with 1 torch thread "
        "on a shared machine it is not inflated by waiting for a busy core, so it is the steadier estimate there",
        "ratio vs unsteered = unsteered time / steered time for the same round (tokens/s ratio); "
        "'ours / this' = median per-round tokens/s ratio of ours (same layers) to that library",
    ]
    section = common.Section(
        title="Steering overhead during generation (overhead.py)",
        command=common.command_line("overhead.py", args),
        machine=info,
        sizes=f"batches {', '.join(map(str, batches))}; {new_tokens} new tokens (greedy, "
        f"min_new_tokens=max_new_tokens); {args.repeats} timed rounds per batch after an untimed warm-up; chat "
        f"prompts of {min(lengths)}-{max(lengths)} tokens (left-padded in a batch)",
        headers=[
            "batch",
            "layers",
            "library",
            "tokens/s (median)",
            "vs unsteered: min",
            "median",
            "max",
            "median, CPU time",
            "ours / this (median)",
            "goal (ours >= 0.98)",
        ],
        rows=rows,
        notes=notes,
        headline="ours / unsteered tokens/s (median): " + ", ".join(headline),
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
