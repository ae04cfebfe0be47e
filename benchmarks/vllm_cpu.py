"""Judged-sweep generation on the vLLM backend vs the transformers backend, on the default model, in one run.

The work is one block of a judged sweep (`scorer = "judge"`): every cell (the unsteered baseline plus drivers x
layers x coefficients, random unit directions scaled by the layer's residual norm) x condition x question, with the
scenario's scratchpad prompt (~800 tokens), steering generated tokens only, greedy, the same number of new tokens
on both sides. Transformers runs it as the sweep does on `backend = "hf"`: one batched `generate` per (question,
condition) with one row per cell. vLLM runs it as the sweep does on `backend = "vllm"`: all requests in one engine
call, each with its own steering, the prompts' prefix cache shared by the cells (reset before every round). A third
side runs the same vLLM requests unsteered (the hooks' overhead).
"""

from __future__ import annotations

import os
import statistics
import time

for _name, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: its work counts in this process's CPU time
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # shared machine: no pinning
}.items():
    os.environ.setdefault(_name, _value)

try:
    import common
except ImportError:  # imported as benchmarks.vllm_cpu
    from benchmarks import common

LAYERS = (9, 15)
COEFFICIENTS = (-0.5, 0.5)  # x the layer's mean residual norm
DRIVERS = 2
SEED = 99
CONDITIONS = ("monitored", "unmonitored")


def cells_of(model, quick: bool) -> list:
    from steering.compliance import BASELINE, Cell

    drivers = 1 if quick else DRIVERS
    layers = LAYERS[:1] if quick else LAYERS
    norms = model.residual_norms()
    cells = [BASELINE]
    for d in range(drivers):
        unit = common.random_unit(model.d_model, SEED + d)
        cells += [Cell(f"d{d}", layer, c, unit, float(norms[layer])) for layer in layers for c in COEFFICIENTS]
    return cells


def hf_block(hf, items, cells, new: int, batch_size: int) -> list[list[int]]:
    """The sweep's transformers path: per (question, condition), one batched generate with a row per cell."""
    import torch

    from steering.compliance import interventions_for

    out = []
    for prompt in items:
        for lo in range(0, len(cells), batch_size):
            chunk = cells[lo : lo + batch_size]
            enc = hf.encode([prompt] * len(chunk))
            with torch.no_grad(), hf.steer(interventions_for(chunk, "generated"), enc.layout):
                ids = hf.model.generate(
                    **enc.inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, temperature=None,
                    top_p=None, top_k=None, pad_token_id=hf.tokenizer.pad_token_id,
                )  # fmt: skip
            out += ids[:, enc.input_ids.shape[1] :].tolist()
    return out


def vllm_block(vm, items, cells, new: int, steered: bool) -> list[list[int]]:
    """The sweep's vLLM path: every (prompt, cell) one request of one engine call."""
    from steering.compliance import interventions_for

    vm.llm.reset_prefix_cache()  # each round starts cold; within it the cells share each prompt's prefix
    rows = [(prompt, cell) for prompt in items for cell in cells]
    ivs = interventions_for([cell for _, cell in rows], "generated") if steered else []
    vm.generate([prompt for prompt, _ in rows], new, ivs, min_new_tokens=new)
    return [list(o.outputs[0].token_ids) for o in vm.last_outputs]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 32, quick 16)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    common.ensure_steering_importable()
    title = "Judged sweep on vLLM vs transformers (vllm_cpu.py)"
    command = common.command_line("vllm_cpu.py", args)
    try:
        import vllm
    except ImportError as exc:
        common.emit(common.Section(title, command, machine=info, status=f"skipped: vLLM not installed ({exc})"), args,
                    started)  # fmt: skip
        return
    import torch

    import steering
    from steering.questions import load_questions
    from steering.scenario import load_setting

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    new = args.tokens or (16 if args.quick else 32)
    n_questions = 1 if args.quick else 2
    hf = steering.load_model("default")
    t0 = time.perf_counter()
    vm = steering.load_model("default", backend="vllm", max_model_len=1024, block_size=32, max_num_seqs=64)
    load_s = time.perf_counter() - t0
    cells = cells_of(vm, args.quick)
    setting = load_setting("animal_welfare")
    questions = load_questions(n=n_questions, seed=0)
    items = [setting.messages(q.question, c, "informative", scratchpad=True) for q in questions for c in CONDITIONS]
    prompt_tokens = [len(r) for r in vm._tokenize(items)[0]]
    results: dict[str, list[list[int]]] = {}

    def side(name: str, fn):
        def run():
            results[name] = fn()

        return run

    sides = {
        "transformers": side("transformers", lambda: hf_block(hf, items, cells, new, batch_size=32)),
        "vllm": side("vllm", lambda: vllm_block(vm, items, cells, new, steered=True)),
        "vllm unsteered": side("vllm unsteered", lambda: vllm_block(vm, items, cells, new, steered=False)),
    }
    requests = len(items) * len(cells)
    layers = ", ".join(map(str, LAYERS[:1] if args.quick else LAYERS))
    common.log(f"vllm_cpu: {requests} requests x {new} tokens, {len(sides)} sides x {args.repeats} rounds")
    cpu: dict[str, list[float]] = {}
    times = common.alternate(sides, args.repeats, warmup=1, log=common.log, cpu=cpu)
    tokens = requests * new
    rows, ratios = [], {}
    for name, t in times.items():
        tok_s = tokens / statistics.median(t)
        if name == "transformers":
            rows.append([name, f"{tok_s:.1f}", "1", "1", "1", "1"])
            continue
        ratio = common.Spread.of(common.speed_ratios(t, times["transformers"]))
        cpu_mid = statistics.median(common.speed_ratios(cpu[name], cpu["transformers"]))
        ratios[name] = ratio
        rows.append([name, f"{tok_s:.1f}", *ratio.cells(2), f"{cpu_mid:.2f}"])
    same = sum(a == b for a, b in zip(results["vllm"], results["transformers"]))
    overhead = common.Spread.of(common.speed_ratios(times["vllm"], times["vllm unsteered"]))
    notes = [
        f"parity: {same}/{requests} steered requests token-identical to the transformers rows (greedy; transformers "
        "batches the cells of one prompt, unpadded since they share it; the exact reference is single-row)",
        f"steered vs unsteered on vLLM (tokens/s ratio, min / median / max): {' / '.join(overhead.cells(3))}",
        f"work: {len(questions)} question(s) x {len(CONDITIONS)} conditions x {len(cells)} cells = {requests} "
        f"requests, prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens (scenario 'informative' with "
        f"scratchpad), {new} new tokens each (`min_new_tokens`); cells = baseline + drivers x layers {layers} x "
        f"coefficients {COEFFICIENTS} of the residual norm",
        "vLLM: enforce_eager, block_size 32, prefix cache reset before each round (the cells of a round share each "
        f"prompt's prefix, as in a sweep); engine load {load_s:.0f} s (not timed)",
        "ratio = transformers time / side time for the same round (> 1: faster than transformers); last column: the "
        "same on this process's CPU seconds (the in-process engine included)",
    ]
    headline = f"vLLM {ratios['vllm'].mid:.2f}x transformers tokens/s (steered judged-sweep block)"
    section = common.Section(
        title,
        command,
        machine=info,
        model=common.DEFAULT_MODEL + f"; vLLM {vllm.__version__}",
        sizes=f"{requests} requests x {new} new tokens per round; {args.repeats} timed rounds after a warm-up",
        headers=["side", "tokens/s (median)", "vs transformers: min", "median", "max", "median, CPU time"],
        rows=rows,
        notes=notes,
        headline=headline,
    )
    common.emit(section, args, started)


if __name__ == "__main__":
    main()
