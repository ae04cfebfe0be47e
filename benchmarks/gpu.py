"""GPU benchmarks on a random-initialised Llama-3-8B-shaped model in bf16: steering overhead, sweep scoring, extraction.

Throughput does not depend on trained weights, so a model of the real shape built on the GPU from a config (no
download) measures what our code costs at that size. Three sections, each a ratio taken in one run (sides
alternating round by round):

1. steered / unsteered greedy tokens/s at batch 1, 8 and 64, one layer and all layers;
2. forced-choice sweep scoring, 8 conversations x 49 cells: ours (`ForcedChoiceScorer`) vs a per-cell full-forward
   loop (and ours one conversation per pass, as before batching);
3. extraction at all layers, 64 pairs: ours (`extract`) vs a plain forward with `output_hidden_states=True`.

Needs only torch, transformers and this checkout (no TransformerLens, nnsight or vLLM). Sections 2 and 3 need a real
tokenizer with a chat template: the default model's (3.5 MB), found in its cache or in the folder given by
``--tokenizer PATH`` (copy ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` there so they
travel with the tree to a machine without the hub). On a machine without CUDA it reports "skipped: no GPU";
``--toy`` (alias ``--dry-run``) runs every section on a toy shape (CPU if no GPU) to check the script.

    python benchmarks/gpu.py                           # on a CUDA machine, ~4-6 minutes on an H100
    python benchmarks/gpu.py --tokenizer tok/          # tokenizer copied into the tree
    python benchmarks/gpu.py --toy --device cpu --quick --threads 1   # CPU dry run of the script
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

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
TOY_MODEL = "toy Llama (hidden 64, 4 layers, vocab 49,152), {dtype} (dry run)"
SECTIONS = ("generation", "sweep", "extraction")
# The sweep grid: the quickstart grid's shape (4 directions x 2 layers x 6 coefficients + the unsteered baseline).
DRIVERS = ("values", "goal_guarding", "sycophancy", "random-0")
COEFFICIENTS = (-0.5, -0.25, -0.1, 0.1, 0.25, 0.5)  # x the layer's mean residual norm
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_model(device: str, tiny: bool = False, vocab: int | None = None, dtype: torch.dtype = torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(common.LLAMA3_8B)
    if tiny:  # --toy: the same code path on a toy shape (vocabulary large enough for the real tokenizer)
        shape = dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=max(1000, vocab or 0),
        )
    config = LlamaConfig(
        **shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def find_tokenizer(path: Path | None) -> Path | None:
    """The folder holding the default model's tokenizer: ``path``, else the default model's cache."""
    candidates = [path] if path is not None else []
    if path is None:
        try:
            from steering.default_model import default_model_dir

            candidates.append(default_model_dir())
        except Exception:  # noqa: BLE001 - any failure just means no cached model
            pass
    for folder in candidates:
        if folder is not None and all((Path(folder) / name).exists() for name in TOKENIZER_FILES):
            return Path(folder)
    return None


def dtype_name(hf) -> str:
    return str(next(hf.parameters()).dtype).replace("torch.", "")


def peak_gib(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "-"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---- 1. generation overhead -------------------------------------------------------------------------------------
def generation_section(args, model, hf, device: str, norms, info: dict) -> common.Section:
    new_tokens = args.tokens or (4 if args.toy else 16 if args.quick else 64)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator(device=device).manual_seed(SEED)
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
    rows, headline = [], []
    started = time.perf_counter()
    from steering import RowLayout

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
        reset_peak(device)
        common.log(f"gpu generation: batch {batch}, {len(sides)} sides x {args.repeats} rounds")
        times = common.alternate(sides, args.repeats, warmup=0, log=common.log)
        base = times["unsteered"]
        for name, t in times.items():
            library, _, layers = name.partition(", ")
            tok_s = batch * new_tokens / statistics.median(t)
            ratio = common.Spread.of(common.speed_ratios(t, base))
            cells = ["1", "1", "1"] if name == "unsteered" else ratio.cells()
            goal = common.verdict(ratio, 0.98) if library == "ours" else ""
            if library == "ours":
                headline.append(f"b{batch} {layers} {ratio.mid:.3f}")
            rows.append([batch, layers or "-", library, f"{tok_s:,.0f}", *cells, goal, peak_gib(device)])
    section = common.Section(
        title="1. Steering overhead in greedy generation (gpu.py)",
        command=args.command,
        model=args.model_line,
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
        notes=[
            f"prompts: {PROMPT_LEN} random token ids per row (no padding); {new_tokens} new tokens, greedy, "
            "min_new_tokens = max_new_tokens; plain `model.generate` (dynamic KV cache, no compile)",
            f"vector: a fixed random direction per layer scaled to {SCALE} x that layer's mean residual norm "
            f"(measured on random ids); '1 layer' = layer {one}; ours steers generated tokens only",
            "ratio vs unsteered = unsteered time / steered time in the same round (tokens/s ratio)",
        ],
        headline="generation ours / unsteered (median): " + ", ".join(headline),
    )
    section.seconds = time.perf_counter() - started
    return section


# ---- 2. forced-choice sweep ---------------------------------------------------------------------------------------
def sweep_cells(model, norms, drivers, layers, coefficients):
    from steering.compliance import BASELINE, Cell

    cells = [BASELINE]
    for d, name in enumerate(drivers):
        unit = common.random_unit(model.d_model, SEED + 100 + d)
        cells += [Cell(name, layer, c, unit, float(norms[layer])) for layer in layers for c in coefficients]
    return cells


def loop_side(model, hf, scorer, ids, starts, cells, device: str, results: dict):
    """What a user of a peer library writes: one full forward per conversation and cell, the vector added by a
    plain forward hook from the assistant turn on (steering-vectors' ``apply(min_token_index=...)`` does the same)."""
    deltas = [
        None if c.vector is None or c.absolute == 0 else (c.absolute * c.vector.float()).to(device) for c in cells
    ]
    rows = [torch.tensor([row], device=device) for row in ids]

    def run():
        out = []
        with torch.no_grad():
            for x, start in zip(rows, starts):
                probs = []
                for cell, delta in zip(cells, deltas):
                    handle = None if delta is None else common.add_from(model.layers[cell.layer], delta, start)
                    try:
                        logits = hf(input_ids=x).logits[:, -1]
                    finally:
                        if handle is not None:
                            handle.remove()
                    probs.append(logits.float().softmax(-1)[0, scorer.letter_ids])
                out.append(torch.stack(probs))
        results["loop"] = torch.stack(out).cpu()

    return run


def sweep_section(args, model, hf, device: str, norms, info: dict) -> common.Section:
    from steering.compliance import CONDITIONS, Conversation, ForcedChoiceScorer, default_batch_tokens
    from steering.questions import load_questions

    started = time.perf_counter()
    n_layers = model.n_layers
    layers = (n_layers // 3, (2 * n_layers) // 3)
    drivers, coefficients = (DRIVERS[:2], COEFFICIENTS[::2]) if args.toy else (DRIVERS, COEFFICIENTS)
    cells = sweep_cells(model, norms, drivers, layers, coefficients)
    n_conv = args.conversations or 8
    questions = load_questions(n=max(1, -(-n_conv // 4)))
    convs = [Conversation(q, c, order) for q in questions for c in CONDITIONS for order in (0, 1)][:n_conv]
    scorer = ForcedChoiceScorer(model)
    ids, starts = scorer.tokenize("base", convs)
    results: dict = {}

    def ours(label: str, **kwargs):
        def run():
            out = scorer.score_conversations("base", convs, cells, "response", **kwargs)
            results[label] = torch.stack([torch.stack(probs) for _, probs, _ in out])

        return run

    sides = {
        "per-cell loop": loop_side(model, hf, scorer, ids, starts, cells, device, results),
        "ours": ours("ours"),
        "ours, one conversation per pass": ours("ours, one conversation per pass", batch_size=32, max_batch_tokens=1),
    }
    budget = default_batch_tokens(model)
    # warm-up, untimed: the loop on one conversation and two cells, ours on the whole work
    loop_side(model, hf, scorer, ids[:1], starts[:1], cells[:2], device, {})()
    for name in ("ours", "ours, one conversation per pass"):
        sides[name]()
    reset_peak(device)
    repeats = min(args.repeats, 3)  # the loop runs conversations x cells full forwards per round
    common.log(f"gpu sweep: {len(convs)} conversations x {len(cells)} cells, {len(sides)} sides x {repeats} rounds")
    times = common.alternate(sides, repeats, warmup=0, log=common.log)
    scored = len(convs) * len(cells)
    rows, headline = [], []
    loop_t = times["per-cell loop"]
    for name, t in times.items():
        per_s = scored / statistics.median(t)
        if name == "per-cell loop":
            rows.append([name, f"{per_s:,.1f}", "1", "1", "1", ""])
            continue
        ratio = common.Spread.of(common.speed_ratios(t, loop_t))
        goal = common.verdict(ratio, 30.0) if name == "ours" else "(before batching conversations)"
        rows.append([name, f"{per_s:,.1f}", *ratio.cells(1), goal])
        headline.append(f"{name} {ratio.mid:.1f}x")

    def shares(p: torch.Tensor) -> torch.Tensor:
        return p[..., 0] / p.sum(-1)

    worst = max(float((shares(results[k]) - shares(results["loop"])).abs().max()) for k in results if k != "loop")
    between = float((shares(results["ours"]) - shares(results["ours, one conversation per pass"])).abs().max())
    user = [start - scorer.shared_prefix(ids, min(starts) - 1) for start in starts]
    section = common.Section(
        title="2. Forced-choice sweep scoring (gpu.py)",
        command=args.command,
        model=args.model_line,
        machine=info,
        sizes=f"{len(convs)} conversations x {len(cells)} cells = {scored} scores per round; {repeats} timed rounds "
        "after an untimed warm-up",
        headers=["side", "scores/s (median)", "vs the loop: min", "median", "max", "goal (ours >= 30x)"],
        rows=rows,
        notes=[
            f"work: {len(questions)} question(s) x {len(CONDITIONS)} conditions x 2 option orders, `base` system "
            f"prompt, the default model's tokenizer and chat template; prompts {min(map(len, ids))}-"
            f"{max(map(len, ids))} tokens, user turns {min(user)}-{max(user)} tokens past the shared system prompt; "
            f"cells = unsteered + {len(drivers)} random directions x layers {layers[0]}, {layers[1]} x coefficients "
            f"{', '.join(map(str, coefficients))} of the layer's mean residual norm; steering the assistant turn",
            "ours = `ForcedChoiceScorer.score_conversations(..., positions='response')` with its defaults: system "
            "prompt prefilled once, the user turns of several conversations in one padded batch on top, then one "
            f"pass over the assistant tokens with rows = conversation x cell; token budget {budget:,} "
            "(`default_batch_tokens`: a share of free GPU memory over the KV bytes per token)",
            "ours, one conversation per pass = `batch_size=32, max_batch_tokens=1`: the scorer as it was before "
            "conversations were batched (cells of one conversation per pass, 32 at most)",
            "per-cell loop = one full forward (`model(input_ids=...)`, all logits) per conversation and cell with a "
            "plain forward hook adding the vector from the assistant turn on",
            f"parity (compliance share P(A) / (P(A) + P(B)), {dtype_name(hf)}): ours vs the loop within "
            f"{worst:.2e}; ours vs one conversation per pass within {between:.2e} (max abs)",
            f"peak GPU memory during the timed rounds: {peak_gib(device)} GiB",
            "ratio = loop time / that side's time in the same round (scores/s over the loop's)",
        ],
        headline="sweep scores/s vs a per-cell loop: " + ", ".join(headline),
    )
    section.seconds = time.perf_counter() - started
    return section


# ---- 3. extraction -------------------------------------------------------------------------------------------------
def extraction_section(args, model, hf, device: str, info: dict) -> common.Section:
    import steering.vectors as vectors_mod
    from steering.vectors.extract import default_extract_tokens, plan_batches

    started = time.perf_counter()
    n_pairs = args.pairs or (16 if args.toy else 64)
    pairs = vectors_mod.load_driver("values", split="train")[:n_pairs]
    texts = [vectors_mod.pair_texts(model, p) for p in pairs]
    lengths = [max(len(model.encode(t[1]).input_ids[0]), len(model.encode(t[2]).input_ids[0])) for t in texts]
    budget = default_extract_tokens(model)
    same = plan_batches(lengths, budget)
    longest_first = [i for batch in same for i in batch]
    fixed = [longest_first[k : k + 16] for k in range(0, n_pairs, 16)]
    stack = getattr(hf, hf.base_model_prefix)
    results: dict = {}

    def plain(batches, label):
        def run():
            out = []
            with torch.no_grad():
                for index in batches:
                    enc = model.encode([texts[i][1] for i in index] + [texts[i][2] for i in index])
                    hidden = stack(**enc.inputs, output_hidden_states=True, use_cache=False).hidden_states
                    out.append(torch.stack([h[:, -1] for h in hidden[1:]]).float())  # [layers, 2b, d]
            results[label] = [o.cpu() for o in out]

        return run

    def ours():
        vs = vectors_mod.extract(model, pairs, layers="all", normalize="none", progress=False)
        results["ours"] = vs

    sides = {
        "plain forward, same batches": plain(same, "plain"),
        "ours (extract, mean_diff)": ours,
        "plain forward, 16 pairs per batch": plain(fixed, "plain16"),
    }
    for fn in sides.values():  # warm-up, untimed
        fn()
    reset_peak(device)
    common.log(f"gpu extraction: {n_pairs} pairs, {len(same)} batch(es), {len(sides)} sides x {args.repeats} rounds")
    times = common.alternate(sides, args.repeats, warmup=0, log=common.log)
    ours_t = times["ours (extract, mean_diff)"]
    rows, headline = [], []
    for name, t in times.items():
        per_s = n_pairs / statistics.median(t)
        if name.startswith("ours"):
            rows.append([name, f"{per_s:,.1f}", "", "", "", ""])
            continue
        ratio = common.Spread.of(common.speed_ratios(ours_t, t))
        goal = common.verdict(ratio, 0.95) if name.endswith("same batches") else "(informational)"
        rows.append([name, f"{per_s:,.1f}", *ratio.cells(), goal])
        headline.append(f"{ratio.mid:.2f}x {name}")
    # parity: mean difference from the plain forward's hidden states (the last block's entry is post-norm: skipped)
    worst = 1.0
    for layer in range(model.n_layers - 1):
        pos = torch.cat([chunk[layer, : len(b)] for chunk, b in zip(results["plain"], same)])
        neg = torch.cat([chunk[layer, len(b) :] for chunk, b in zip(results["plain"], same)])
        ref = pos.mean(0) - neg.mean(0)
        worst = min(worst, float(torch.nn.functional.cosine_similarity(ref, results["ours"][layer], dim=0)))
    n_tokens = sum(2 * len(b) * lengths[b[0]] for b in same)
    section = common.Section(
        title="3. Vector extraction at all layers (gpu.py)",
        command=args.command,
        model=args.model_line,
        machine=info,
        sizes=f"{n_pairs} pairs of the packaged 'values' driver ({2 * n_pairs} texts, {n_tokens:,} padded tokens in "
        f"{len(same)} batch(es)); all {model.n_layers} layers; {args.repeats} timed rounds after a warm-up",
        headers=["side", "pairs/s (median)", "ours / this: min", "median", "max", "goal"],
        rows=rows,
        notes=[
            f"ours = `extract(model, pairs, layers='all')` with its defaults: pairs sorted by length, batches of at "
            f"most {budget:,} padded tokens (`default_extract_tokens`), the next batch encoded on a helper thread, "
            "activations copied to the host once at the end",
            "plain forward = the decoder stack (`model.model(..., output_hidden_states=True, use_cache=False)`) "
            "over the same texts, tokenizing included, reading the last token of every layer's hidden state: "
            "'same batches' uses our batches (the goal), '16 pairs per batch' the fixed count ours used before",
            "the plain sides get the chat-formatted texts and the batch plan for free (computed before timing); "
            "ours formats, tokenizes and plans inside the timed call",
            f"parity: cosine(ours mean_diff, mean difference of the plain forward's hidden states) >= {worst:.4f} "
            f"over layers 0-{model.n_layers - 2} ({dtype_name(hf)})",
            f"peak GPU memory during the timed rounds: {peak_gib(device)} GiB",
            "ratio = ours pairs/s / that side's pairs/s, per round",
        ],
        headline="extraction ours pairs/s vs: " + ", ".join(headline),
    )
    section.seconds = time.perf_counter() - started
    return section


def skipped(title: str, why: str, args, info: dict, headers, rows) -> common.Section:
    return common.Section(
        title, args.command, model=args.model_line, machine=info, status=f"skipped: {why}", headers=headers, rows=rows
    )


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64", help="generation batch sizes, comma-separated")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per generation call (default 64, quick 16)")
    p.add_argument("--toy", "--dry-run", dest="toy", action="store_true", help="toy shape: checks the script only")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to run (auto: CUDA if any)")
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with the default model's tokenizer files")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--conversations", type=int, default=None, help="sweep conversations (default 8)")
    p.add_argument("--pairs", type=int, default=None, help="extraction pairs (default 64, toy 16)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    args.command = common.command_line("gpu.py", args).replace(".venv/bin/python", "python")
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls are ~7x slower on a CPU
    args.model_line = MODEL if not args.toy else TOY_MODEL.format(dtype=str(dtype).replace("torch.", ""))
    title = "GPU benchmarks, Llama-3-8B shape (gpu.py)"
    if device == "cpu" and not args.toy:
        why = "no GPU"
        sections = [
            skipped(
                "1. Steering overhead in greedy generation (gpu.py)",
                why,
                args,
                info,
                ["batch", "layers", "ours / unsteered"],
                [[b, "1 and all", "not measured (no GPU lent to this task)"] for b in args.batches.split(",")],
            ),
            skipped(
                "2. Forced-choice sweep scoring (gpu.py)",
                why,
                args,
                info,
                ["side", "vs the loop"],
                [["ours, 8 conversations x 49 cells", "not measured (no GPU lent to this task)"]],
            ),
            skipped(
                "3. Vector extraction at all layers (gpu.py)",
                why,
                args,
                info,
                ["side", "ours / this"],
                [["plain forward with output_hidden_states, 64 pairs", "not measured (no GPU lent to this task)"]],
            ),
        ]
        sections[0].notes = ["run `python benchmarks/gpu.py` on a CUDA machine to fill these tables"]
        common.emit_sections(title, sections, args, started, "not measured (no GPU lent to this task)")
        return
    common.ensure_steering_importable()
    from steering import SteeringModel
    from steering.hooks import mean_norms

    tokenizer_dir = find_tokenizer(args.tokenizer)
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf = build_model(device, tiny=args.toy, vocab=len(tokenizer) if tokenizer is not None else None, dtype=dtype)
    model = SteeringModel(hf, tokenizer, name="llama-3-8b-shape-random")
    gen = torch.Generator(device=device).manual_seed(SEED)
    probe = torch.randint(3, hf.config.vocab_size, (4, PROMPT_LEN), device=device, generator=gen)
    norms = mean_norms(hf, probe, torch.ones_like(probe))
    sections = []
    for name in wanted:
        if name == "generation":
            sections.append(generation_section(args, model, hf, device, norms, info))
        elif tokenizer is None:
            why = "no tokenizer: pass --tokenizer PATH (a folder with the default model's tokenizer files)"
            sections.append(skipped(f"{name} (gpu.py)", why, args, info, [], []))
        elif name == "sweep":
            sections.append(sweep_section(args, model, hf, device, norms, info))
        else:
            sections.append(extraction_section(args, model, hf, device, info))
        common.log(f"gpu: {name} done in {time.perf_counter() - started:.0f} s")
    for section in sections:
        if args.toy:
            section.notes.insert(0, "DRY RUN on a toy shape: checks the script, the figures mean nothing")
    headline = ("DRY RUN, " if args.toy else "") + "; ".join(s.headline or s.status for s in sections)
    common.emit_sections(title, sections, args, started, headline)


if __name__ == "__main__":
    main()
