"""Contrast pairs -> driver vectors (one per layer) -> safetensors / GGUF vector files.

>>> from steering import load_model
>>> from steering.vectors import extract, load_driver
>>> model = load_model("default")
>>> vs = extract(model, load_driver("values", "train"), driver="values")
>>> vs.save("values.safetensors")
"""

from .datasets import (
    DATA_DIR,
    DRIVERS,
    dataset_sha256,
    driver_path,
    file_sha256,
    load_caa_json,
    load_csv,
    load_driver,
    load_jsonl,
    load_mwe_jsonl,
    load_pairs,
)
from .extract import NORMALIZATIONS, READ_POSITIONS, balance_groups, collect_activations, extract, pair_texts
from .gguf_export import export_gguf, read_gguf
from .methods import METHODS, group_weights, mean_diff, pca, probe
from .pairs import ContrastPair, answer_completion, answer_letter, caa_pair, has_splits, pairs_sha256, select_split
from .quality import layer_quality, letter_direction, projection_quality, quality_table
from .vectorset import FORMAT, VectorSet, VectorTransferWarning, best_layers

__all__ = [
    "DATA_DIR",
    "DRIVERS",
    "FORMAT",
    "METHODS",
    "NORMALIZATIONS",
    "READ_POSITIONS",
    "ContrastPair",
    "VectorSet",
    "VectorTransferWarning",
    "answer_completion",
    "answer_letter",
    "balance_groups",
    "best_layers",
    "caa_pair",
    "collect_activations",
    "dataset_sha256",
    "driver_path",
    "export_gguf",
    "extract",
    "file_sha256",
    "group_weights",
    "has_splits",
    "layer_quality",
    "letter_direction",
    "load_caa_json",
    "load_csv",
    "load_driver",
    "load_jsonl",
    "load_mwe_jsonl",
    "load_pairs",
    "mean_diff",
    "pair_texts",
    "pairs_sha256",
    "pca",
    "probe",
    "projection_quality",
    "quality_table",
    "read_gguf",
    "select_split",
]
