"""Vector extraction speed (pairs/s): ours (mean_diff, pca) vs a plain forward pass, steering-vectors and repeng.

All sides read the same texts (the chat-formatted prompt followed by the "(A" / "(B" completion) at the same
token (the answer letter, i.e. the last token) at every layer, in batches of the same number of pairs.
"""

from __future__ import annotations

import statistics
import time

import torch

try:
    import common
except ImportError:  # imported as benchmarks.extraction
    from benchmarks import common

BATCH_PAIRS = 16


def cosine_floor(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor], signed: bool = True) -> float:
    """Lowest cosine similarity over layers between two {layer: vector} maps (absolute value if not ``signed``)."""
    worst = 1.0
    for layer, va in a.items():
        vb = torch.as_tensor(b[layer], dtype=torch.float32).flatten()
        cos = float(torch.nn.functional.cosine_similarity(va.float().flatten(), vb, dim=0))
        worst = min(worst, cos if signed else abs(cos))
    return worst


def build_sides(model, pairs, vectors_mod, results: dict, notes: list[str]) -> dict:
    """name -> zero-argument callable extracting from ``pairs`` at every layer; last outputs go to ``results``."""
    hf, tok = model.model, model.tokenizer
    layers = list(range(model.n_layers))
    texts = [vectors_mod.pair_texts(model, p) for p in pairs]
    sides = {}

    # Plain forward: the decoder stack over the same texts in the same batches as ours (our plan: pairs sorted by
    # token length, at most BATCH_PAIRS pairs and the default token budget per batch, positives and negatives of a
    # batch in one left-padded batch); tokenizing is included, the plan is computed once here.
    from steering.vectors.extract import default_extract_tokens, plan_batches

    lengths = [max(len(model.encode(t[1]).input_ids[0]), len(model.encode(t[2]).input_ids[0])) for t in texts]
    batches = plan_batches(lengths, default_extract_tokens(model), BATCH_PAIRS)
    stack = getattr(hf, hf.base_model_prefix)

    def plain():
        with torch.no_grad():
            for index in batches:
                enc = model.encode([texts[i][1] for i in index] + [texts[i][2] for i in index])
                stack(**enc.inputs, use_cache=False)

    sides["plain forward"] = plain
    for method in ("mean_diff", "pca"):

        def ours(method=method):
            vs = vectors_mod.extract(
                model, pairs, layers="all", method=method, position="answer", batch_size=BATCH_PAIRS, progress=False
            )
            results[f"ours {method}"] = {layer: vs[layer] for layer in layers}

        sides[f"ours {method}"] = ours

    sv, why = common.load_steering_vectors()
    if sv is None:
        notes.append(f"steering-vectors: {why}")
    else:
        samples = [(pos, neg) for _, pos, neg in texts]

        def peer_sv():
            vector = sv.train_steering_vector(
                hf, tok, samples, layers=layers, read_token_index=-1, batch_size=BATCH_PAIRS, show_progress=False
            )
            results["steering-vectors"] = vector.layer_activations

        sides["steering-vectors (mean)"] = peer_sv

    rp, why = common.load_repeng()
    if rp is None:
        notes.append(f"repeng: {why}")
    else:
        dataset = [rp.DatasetEntry(positive=pos, negative=neg) for _, pos, neg in texts]

        def peer_repeng():
            control = rp.ControlVector.train(
                hf, tok, dataset, hidden_layers=layers, batch_size=2 * BATCH_PAIRS, method="pca_diff"
            )
            results["repeng"] = control.directions

        sides["repeng (pca_diff)"] = peer_repeng
    return sides


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=None, help="contrast pairs per extraction (default 16, quick 4)")
    p.add_argument("--driver", default="values", help="packaged driver dataset to read pairs from")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    import steering

    n_pairs = args.pairs or (4 if args.quick else 16)
    title = "Vector extraction speed (extraction.py)"
    command = common.command_line("extraction.py", args)
    try:
        import steering.vectors as vectors_mod

        vectors_mod.extract, vectors_mod.load_driver, vectors_mod.pair_texts  # noqa: B018
    except (ImportError, AttributeError) as exc:
        section = common.Section(title, command, machine=info, status=f"pending: steering.vectors.extract ({exc})")
        common.emit(section, args, started)
        return
    model = steering.load_model("default")
    pairs = vectors_mod.load_driver(args.driver, split="train")[:n_pairs]
    notes: list[str] = []
    results: dict = {}
    warm = build_sides(model, pairs[:2], vectors_mod, {}, [])
    for fn in warm.values():  # warm-up, untimed
        fn()
    sides = build_sides(model, pairs, vectors_mod, results, notes)
    common.log(f"extraction: {len(pairs)} pairs, {len(sides)} sides x {args.repeats} rounds")
    cpu: dict[str, list[float]] = {}
    times = common.alternate(sides, args.repeats, warmup=0, log=common.log, cpu=cpu)

    goals = {"plain forward": 0.95, "steering-vectors (mean)": 1.0}
    rows, headline = [], []
    for name, t in times.items():
        pairs_s = len(pairs) / sorted(t)[len(t) // 2]
        if name.startswith("ours"):
            rows.append([name, f"{pairs_s:.2f}", "", "", "", "", "", ""])
            continue
        md = common.Spread.of(common.speed_ratios(times["ours mean_diff"], t))
        pc = common.Spread.of(common.speed_ratios(times["ours pca"], t))
        goal = common.verdict(md, goals[name]) if name in goals else "(informational)"
        md_cpu = statistics.median(common.speed_ratios(cpu["ours mean_diff"], cpu[name]))
        rows.append([name, f"{pairs_s:.2f}", *md.cells(), f"{md_cpu:.3f}", f"{pc.mid:.3f}", goal])
        headline.append(f"{md.mid:.2f}x {name}")

    texts = [vectors_mod.pair_texts(model, p) for p in pairs]
    enc = model.encode([t[1] for t in texts] + [t[2] for t in texts])
    n_tokens = int(enc.attention_mask.sum())
    ours = results.get("ours mean_diff", {})
    if "steering-vectors" in results and ours:
        cos = cosine_floor(ours, results["steering-vectors"])
        notes.insert(0, f"parity: cosine(ours mean_diff, steering-vectors mean) >= {cos:.6f} over all layers")
    if "repeng" in results and "ours pca" in results:
        inner = {layer: v for layer, v in results["ours pca"].items() if layer < model.n_layers - 1}
        cos = cosine_floor(inner, results["repeng"], signed=False)
        notes.insert(1, f"parity: |cosine(ours pca, repeng pca_diff)| >= {cos:.4f} over layers 0-{model.n_layers - 2}")
    notes += [
        f"pairs: the first {len(pairs)} train pairs of the packaged '{args.driver}' driver; texts = chat template "
        "(SmolLM2's default system prompt, the user turn, the assistant header) + '(A' or '(B'",
        f"batching: ours and the plain forward use the same batches (ours: longest pairs first, at most "
        f"{BATCH_PAIRS} pairs and the default token budget per batch), positives and negatives of a batch in one "
        f"left-padded forward pass; steering-vectors runs the positives and the negatives as two passes of "
        f"{BATCH_PAIRS}; repeng runs {2 * BATCH_PAIRS} texts per pass",
        "plain forward = the decoder stack only (`model.model(...)`, no LM head, use_cache=False) over the same "
        "batches, tokenizing included: the floor any extraction must pay",
        "steering-vectors `train_steering_vector(..., read_token_index=-1)` clones every position of every layer "
        "then reads the last token; repeng `ControlVector.train` runs the full model with output_hidden_states=True "
        "(logits included), reads the last token per row in Python, then fits sklearn PCA on the pos-neg differences "
        "(`pca_diff`, like ours `pca`); its layer 29 is the final-norm output, so the parity check skips it",
        "ratio = ours pairs/s / that side's pairs/s, per round (same round, alternating order); 'median, CPU time' "
        "= the same on this process's CPU seconds (steadier on a shared machine with 1 torch thread)",
    ]
    section = common.Section(
        title=title,
        command=command,
        machine=info,
        sizes=f"{len(pairs)} pairs ({2 * len(pairs)} texts, {n_tokens:,} tokens, {n_tokens / (2 * len(pairs)):.0f} "
        f"per text); all {model.n_layers} layers; {args.repeats} timed rounds after an untimed warm-up on 2 pairs",
        headers=[
            "side",
            "pairs/s (median)",
            "ours mean_diff / this: min",
            "median",
            "max",
            "median, CPU time",
            "ours pca / this (median)",
            "goal",
        ],
        rows=rows,
        notes=notes,
        headline="ours mean_diff pairs/s (median) vs: " + ", ".join(headline),
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
