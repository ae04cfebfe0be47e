"""Run a small sweep on a tiny seeded model (used by the kill -9 test as a subprocess, and in-process).

usage: python tests/sweep_worker.py SPEC.toml TOKENIZER_DIR
"""

from __future__ import annotations

import sys

import torch


def tiny_model(tokenizer_dir: str, max_positions: int = 2048, name: str = "tiny-llama"):
    """A tiny random Llama with the default model's tokenizer (chat template included), same weights every time."""
    import transformers as tf

    from steering import SteeringModel

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return SteeringModel(tf.LlamaForCausalLM(config).eval(), tokenizer, name=name)


def main() -> None:
    import os
    import time

    from steering.store import ResultStore
    from steering.sweep import run_sweep

    pause = float(os.environ.get("SWEEP_WORKER_PAUSE", "0"))  # seconds after each commit: the kill lands mid-run
    if pause:
        write_rows = ResultStore.write_rows

        def slow_write_rows(self, rows):
            written = write_rows(self, rows)
            time.sleep(pause)
            return written

        ResultStore.write_rows = slow_write_rows
    torch.set_num_threads(1)
    spec, tokenizer_dir = sys.argv[1], sys.argv[2]
    run_sweep(spec, model=tiny_model(tokenizer_dir), progress=False)


if __name__ == "__main__":
    main()
