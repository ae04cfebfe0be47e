"""``steering extract``: one driver vector per layer from contrast pairs into a .safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path

from steering.cli._backend import add_backend

NAME = "extract"
HELP = "extract one driver vector per layer from contrast pairs into a .safetensors file"


def _columns(text: str | None) -> dict[str, str] | None:
    """``"prompt=q,positive=a,negative=b"`` -> a column mapping for the generic loaders."""
    if not text:
        return None
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise ValueError(
            f"--columns {text!r} is not understood; write it as prompt=COL,positive=COL,negative=COL"
        ) from None


def _dataset(source: str, split: str, columns: dict | None):
    """(driver name, pairs of ``split``, held-out test pairs or None, dataset sha256) for a driver name or a file."""
    from steering.vectors import DRIVERS, dataset_sha256, has_splits, load_pairs, select_split

    if source in DRIVERS:
        name, pairs = source, load_pairs(source, "all")
    else:
        name, pairs = Path(source).stem, load_pairs(source, "all", columns)
    if not has_splits(pairs):
        print(f"note: {source} has no train/test split; extracting from all {len(pairs)} pairs, no held-out quality")
        return name, pairs, None, dataset_sha256(source)
    chosen = select_split(pairs, split)
    if not chosen:
        raise ValueError(f"{source} has no pairs in split {split!r}; pass --split train, test or all")
    test = select_split(pairs, "test") if split == "train" else None
    return name, chosen, test or None, dataset_sha256(source)


def format_quality(quality) -> str:
    """A quality table as aligned text, the best layer marked with ``*``."""
    from steering.vectors import best_layers

    best = best_layers(quality, 1)[0]
    lines = ["  layer  accuracy  separation  mean_gap  n_pairs"]
    for row in quality.itertuples(index=False):
        mark = "*" if row.layer == best else " "
        lines.append(
            f"{mark} {row.layer:5d}  {row.accuracy:8.3f}  {row.separation:10.3f}  {row.mean_gap:8.3f}  {row.n_pairs:7d}"
        )
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, local folder, .gguf file, 'default' or 'organism'")
    add_backend(p)
    p.add_argument(
        "--driver", required=True, help="values, goal_guarding, sycophancy, or a data file (.jsonl/.json/.csv)"
    )
    p.add_argument("--layers", default="all", help="'all' or a comma list such as 3,5,7")
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    p.add_argument("--position", default="answer", choices=["answer", "last", "mean"])
    p.add_argument("--normalize", default="unit", choices=["unit", "none", "residual"])
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="pairs to extract from")
    p.add_argument("--n-pairs", type=int, default=None, help="use only the first N pairs of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--columns", help="column mapping for generic JSONL/CSV: prompt=COL,positive=COL,negative=COL")
    p.add_argument("--out", required=True, help="output .safetensors file")


def execute(args: argparse.Namespace) -> None:
    from steering import load_model
    from steering.vectors import extract, layer_quality

    name, pairs, test, sha = _dataset(args.driver, args.split, _columns(args.columns))
    if args.n_pairs is not None:
        if args.n_pairs < 1:
            raise ValueError(f"--n-pairs {args.n_pairs}: pass a positive number of pairs")
        pairs = pairs[: args.n_pairs]
    model = load_model(args.model, backend=args.backend)
    vs = extract(
        model,
        pairs,
        layers=args.layers,
        method=args.method,
        position=args.position,
        normalize=args.normalize,
        batch_size=args.batch_size,
        driver=name,
        dataset_sha256=sha,
    )
    if test:
        vs.quality = layer_quality(model, vs, test, batch_size=args.batch_size)
        print(f"held-out quality ({len(test)} test pairs; separation = Cohen's d of pos vs neg projections):")
        print(format_quality(vs.quality))
        print(f"best layers: {', '.join(map(str, vs.best_layers(3)))}")
    out = vs.save(args.out)
    print(f"wrote {out}: {vs.driver} x {len(vs)} layers from {vs.n_pairs} pairs ({vs.method}, {vs.normalized})")
