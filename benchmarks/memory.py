"""Peak memory of extraction (ours) as the number of pairs and the sequence length grow.

Each point runs in a fresh subprocess (``--point``) so peaks never mix. A point loads the model, warms up, then
measures its peak RSS over the workload alone (the kernel high-water mark, reset just before it); "growth" is
that peak minus the RSS right before. Sequence-length points also measure a bare forward pass of the decoder
stack over the same batch, and steering-vectors' extraction, so the table shows what extraction adds on top.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

try:
    import common
except ImportError:  # imported as benchmarks.memory
    from benchmarks import common

SEQ_PAIRS = 4  # pairs per sequence-length point: 8 texts, one batch
BATCH_PAIRS = 16


def short_pairs(n: int):
    from steering.vectors import ContrastPair

    return [ContrastPair(f"Item {i}: which option is better, A or B?", "(A", "(B") for i in range(n)]


def long_pairs(model, n: int, length: int):
    """``n`` pairs whose texts are about ``length`` tokens (filler text in the user turn)."""
    from steering.vectors import ContrastPair, pair_texts

    filler = model.tokenizer(
        " ".join(["the farm keeps hens, pigs and cows in open barns"] * (length // 4 + 8)), add_special_tokens=False
    )["input_ids"]
    overhead = len(model.encode(pair_texts(model, ContrastPair("x", "(A", "(B"))[1]).input_ids[0]) - 1
    body = model.tokenizer.decode(filler[: max(1, length - overhead - 2)])
    return [ContrastPair(f"{i}. {body}", "(A", "(B") for i in range(n)]


def run_point(kind: str, pairs_n: int, length: int) -> dict:
    """One measurement in this process: ``kind`` is ours / forward / steering-vectors."""
    import torch

    import steering
    from steering.vectors import extract, pair_texts

    model = steering.load_model("default")
    pairs = short_pairs(pairs_n) if length == 0 else long_pairs(model, pairs_n, length)
    texts = [pair_texts(model, p) for p in pairs]
    enc = model.encode([t[1] for t in texts] + [t[2] for t in texts])
    stack = getattr(model.model, model.model.base_model_prefix)
    layers = list(range(model.n_layers))

    def ours(batch):
        extract(model, batch, layers="all", method="mean_diff", batch_size=BATCH_PAIRS, progress=False)

    def forward(batch):
        with torch.no_grad():
            sub = [pair_texts(model, p) for p in batch]
            stack(**model.encode([t[1] for t in sub] + [t[2] for t in sub]).inputs, use_cache=False)

    def peer(batch):
        sv, why = common.load_steering_vectors()
        if sv is None:
            raise RuntimeError(why)
        sub = [pair_texts(model, p)[1:] for p in batch]
        sv.train_steering_vector(
            model.model,
            model.tokenizer,
            sub,
            layers=layers,
            read_token_index=-1,
            batch_size=BATCH_PAIRS,
            show_progress=False,
        )

    work = {"ours": ours, "forward": forward, "steering-vectors": peer}[kind]
    work(pairs[:2])  # warm-up: lazy allocations belong to the baseline
    start = time.perf_counter()
    with common.PeakWatch() as watch:
        work(pairs)
    return {
        "kind": kind,
        "pairs": len(pairs),
        "texts": 2 * len(pairs),
        "tokens": int(enc.attention_mask.sum()),
        "max_len": int(enc.attention_mask.sum(dim=1).max()),
        "before": watch.before,
        "peak": watch.peak,
        "growth": watch.growth,
        "seconds": time.perf_counter() - start,
        "kept_mb": 2 * len(pairs) * model.n_layers * model.d_model * 4 / 2**20,
    }


def spawn(kind: str, pairs_n: int, length: int, threads: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", f"{kind}:{pairs_n}:{length}", "--threads", threads]
    common.log(f"memory: {kind}, {pairs_n} pairs, length {length or 'short'}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"kind": kind, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def mb(x: float) -> str:
    return f"{x:,.0f}"


def headline(rows: list) -> str:
    parts = [f"{r[1]} pairs +{r[5]} MB" for r in rows if r[0] == "pairs"]
    parts += [f"{r[2]} tok/text: ours - forward {r[7]} MB" for r in rows if r[0] == "length" and r[7]]
    return "peak growth over the loaded model: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--point", default=None, help="internal: run one point 'kind:pairs:length' and print JSON")
    p.add_argument("--pair-counts", default=None, help="comma-separated pair counts (default 16,64,256; quick 4,16)")
    p.add_argument("--lengths", default=None, help="tokens per text (default 64,256,1024; quick 64)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    if args.point:
        kind, pairs_n, length = args.point.split(":")
        print(json.dumps(run_point(kind, int(pairs_n), int(length))), flush=True)
        return
    title = "Peak memory of extraction (memory.py)"
    command = common.command_line("memory.py", args)
    try:
        import steering.vectors as vectors_mod

        vectors_mod.extract, vectors_mod.ContrastPair  # noqa: B018
    except (ImportError, AttributeError) as exc:
        common.emit(
            common.Section(title, command, machine=info, status=f"pending: steering.vectors ({exc})"), args, started
        )
        return
    counts = [int(x) for x in (args.pair_counts or ("4,16" if args.quick else "16,64,256")).split(",")]
    lengths = [int(x) for x in (args.lengths or ("64" if args.quick else "64,256,1024")).split(",")]
    threads = str(info["threads"])
    notes, rows = [], []

    def failed(point: dict) -> bool:
        if "error" in point:
            notes.append(f"{point['kind']} point failed: {point['error']}")
            return True
        return False

    for n in counts:
        point = spawn("ours", n, 0, threads)
        if failed(point):
            continue
        rows.append(
            [
                "pairs",
                point["pairs"],
                f"{point['tokens'] / point['texts']:.0f}",
                mb(point["before"]),
                mb(point["peak"]),
                mb(point["growth"]),
                "",
                "",
                "",
                f"{point['kept_mb']:.1f}",
                f"{point['seconds']:.1f}",
            ]
        )
    for length in lengths:
        points = {kind: spawn(kind, SEQ_PAIRS, length, threads) for kind in ("ours", "forward", "steering-vectors")}
        ours, fwd, sv = points["ours"], points["forward"], points["steering-vectors"]
        if failed(ours):
            continue
        fwd_ok, sv_ok = not failed(fwd), not failed(sv)
        rows.append(
            [
                "length",
                ours["pairs"],
                ours["max_len"],
                mb(ours["before"]),
                mb(ours["peak"]),
                mb(ours["growth"]),
                mb(fwd["growth"]) if fwd_ok else "",
                f"{ours['growth'] - fwd['growth']:+,.0f}" if fwd_ok else "",
                mb(sv["growth"]) if sv_ok else "",
                f"{ours['kept_mb']:.1f}",
                f"{ours['seconds']:.1f}",
            ]
        )
    notes += [
        "pairs rows: short synthetic A/B prompts ('Item i: which option is better, A or B?'), growing pair count; "
        f"length rows: {SEQ_PAIRS} pairs ({2 * SEQ_PAIRS} texts, one batch) with filler text padded to the length",
        "RSS after load = resident memory after loading the model and a 2-pair warm-up; peak = high-water mark "
        "during the workload alone; growth = peak - RSS after load",
        "forward = the decoder stack alone over the same batch (no capture): what any extraction pays; "
        "ours - forward = what extraction adds on top of the forward pass",
        "kept = the activations extraction keeps (2 x pairs x layers x d_model x 4 bytes), the only part meant to "
        "grow with pairs; ours keeps one position per text, so nothing but the forward pass grows with length",
        f"steering-vectors = `train_steering_vector` on the same texts (batch {BATCH_PAIRS}), for scale: it clones "
        "every position of every layer before reading the last token",
    ]
    section = common.Section(
        title=title,
        command=command,
        machine=info,
        sizes=f"pair counts {', '.join(map(str, counts))} (short prompts); tokens per text "
        f"{', '.join(map(str, lengths))} at {SEQ_PAIRS} pairs; all layers; batch {BATCH_PAIRS} pairs; "
        "one fresh process per point",
        headers=[
            "grows",
            "pairs",
            "tokens/text",
            "RSS after load (MB)",
            "peak (MB)",
            "growth: ours (MB)",
            "growth: forward (MB)",
            "ours - forward (MB)",
            "growth: steering-vectors (MB)",
            "kept (MB)",
            "seconds (ours)",
        ],
        rows=rows,
        notes=notes,
        peak_rss=max((float(r[4].replace(",", "")) for r in rows), default=None),
        headline=headline(rows),
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
