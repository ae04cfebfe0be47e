"""Steering overhead on a GPU: a random-initialised Llama-3-8B-shaped model in bf16, batches 1, 8 and 64.

Throughput does not depend on trained weights, so a model of the real shape built on the GPU from a config (no
download) measures what steering costs at that size. Needs only torch, transformers and this repository; on a
machine without CUDA it reports "skipped: no GPU". Run it with ``python benchmarks/gpu.py``.
"""

from __future__ import annotations

import time

import torch

try:
    import common
except ImportError:  # imported as benchmarks.gpu
    from benchmarks import common

ONE_LAYER = 16
SCALE = 0.3
SEED = 1234
PROMPT_LEN = 128
MODEL = (
    "random-initialised Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256), bf16"
)


def build_model(device: str, tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
    if tiny:  # --dry-run: the same code path on a toy shape
        shape = dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=1000,
        )
    config = LlamaConfig(
        **shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per call (default 64, quick 16)")
    p.add_argument("--dry-run", action="store_true", help="check the script on a toy shape (CPU if no GPU); no figures")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    title = "Steering overhead on a GPU, Llama-3-8B shape (gpu.py)"
    command = common.command_line("gpu.py", args).replace(".venv/bin/python", "python")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        section = common.Section(
            title,
            command,
            model=MODEL,
            machine=info,
            status="skipped: no GPU",
            headers=["batch", "layers", "ours / unsteered"],
            rows=[[b, "1 and all", "not measured (no GPU lent to this task)"] for b in args.batches.split(",")],
            notes=["run `python benchmarks/gpu.py` on a CUDA machine to fill it"],
            headline="not measured (no GPU lent to this task)",
        )
        common.emit(section, args, started)
        return
    common.ensure_steering_importable()
    from steering import RowLayout, SteeringModel
    from steering.hooks import mean_norms

    new_tokens = args.tokens or (16 if args.quick else 64)
    batches = [int(b) for b in args.batches.split(",")]
    hf = build_model(device, tiny=args.dry_run)
    model = SteeringModel(hf, None, name="llama-3-8b-shape-random")
    gen = torch.Generator(device=device).manual_seed(SEED)
    probe = torch.randint(3, hf.config.vocab_size, (4, PROMPT_LEN), device=device, generator=gen)
    norms = mean_norms(hf, probe, torch.ones_like(probe))
    vectors = {
        layer: common.random_unit(model.d_model, SEED + layer) * SCALE * float(norms[layer])
        for layer in range(model.n_layers)
    }
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
    )
    one = min(ONE_LAYER, model.n_layers // 2)
    layer_sets = {"1 layer": [one], "all layers": list(range(model.n_layers))}
    rows, notes, headline = [], [], []
    for batch in batches:
        ids = torch.randint(3, hf.config.vocab_size, (batch, PROMPT_LEN), device=device, generator=gen)
        mask = torch.ones_like(ids)
        layout = RowLayout(prompt_len=torch.full((batch,), PROMPT_LEN, device=device))

        def generate(n=new_tokens, ids=ids, mask=mask):
            with torch.no_grad():
                return hf.generate(
                    input_ids=ids, attention_mask=mask, **dict(kwargs, max_new_tokens=n, min_new_tokens=n)
                )

        sides = {"unsteered": generate}
        for label, layers in layer_sets.items():
            ivs = [model.intervention(layer, vectors[layer], 1.0, positions="generated") for layer in layers]

            def ours(ivs=ivs, layout=layout, generate=generate):
                with model.steer(ivs, layout):
                    return generate()

            sides[f"ours, {label}"] = ours
        generate(2)  # warm-up (CUDA context, kernels, allocator)
        for name in sides:
            sides[name]()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        common.log(f"gpu: batch {batch}, {len(sides)} sides x {args.repeats} rounds")
        times = common.alternate(sides, args.repeats, warmup=0, log=common.log)
        base = times["unsteered"]
        for name, t in times.items():
            library, _, layers = name.partition(", ")
            tok_s = batch * new_tokens / sorted(t)[len(t) // 2]
            cells = ["1", "1", "1"] if name == "unsteered" else common.Spread.of(common.speed_ratios(t, base)).cells()
            goal = common.verdict(common.Spread.of(common.speed_ratios(t, base)), 0.98) if library == "ours" else ""
            if library == "ours":
                headline.append(f"b{batch} {layers} {common.Spread.of(common.speed_ratios(t, base)).mid:.3f}")
            memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append([batch, layers or "-", library, f"{tok_s:,.0f}", *cells, goal, f"{memory:.1f}"])
    notes += [
        f"prompts: {PROMPT_LEN} random token ids per row (no padding); {new_tokens} new tokens, greedy, "
        "min_new_tokens = max_new_tokens; plain `model.generate` (dynamic KV cache, no compile)",
        f"vector: a fixed random direction per layer scaled to {SCALE} x that layer's mean residual norm (measured "
        f"on random ids); '1 layer' = layer {one}; ours steers generated tokens only",
        "ratio vs unsteered = unsteered time / steered time in the same round (tokens/s ratio)",
    ]
    if args.dry_run:
        notes.insert(0, "DRY RUN on a toy shape (hidden 64, 4 layers): checks the script, the figures mean nothing")
    section = common.Section(
        title=title,
        command=command,
        model=MODEL if not args.dry_run else "toy Llama (dry run)",
        machine=info,
        sizes=f"batches {', '.join(map(str, batches))}; prompt {PROMPT_LEN} tokens; {new_tokens} new tokens; "
        f"{args.repeats} timed rounds per batch after a warm-up",
        headers=[
            "batch",
            "layers",
            "library",
            "tokens/s (median)",
            "vs unsteered: min",
            "median",
            "max",
            "goal (ours >= 0.98)",
            "peak GPU memory (GiB)",
        ],
        rows=rows,
        notes=notes,
        headline=("DRY RUN, " if args.dry_run else "") + "ours / unsteered (median): " + ", ".join(headline),
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
