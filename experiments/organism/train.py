"""Fit the organism's LoRA adapter on the default model and write it (bf16 safetensors) with its training record.

    python -m steering.experiments.organism.train --seed 0 --out steering/data/organism

Two stages (see ``data.epoch_examples``): values first, then alignment faking. Needs the ``train`` extra
(peft). Gradients run through the whole prompt: each batch shares one system prompt,
prefilled once *with* gradients, its KV cache repeated over the batch rows, then each row's user turn and
assistant target run on top (the same numbers as full-length rows, about 4x fewer tokens). The held-out gap is
measured with the project's forced-choice scorer after every epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from steering.compliance import ForcedChoiceScorer
from steering.default_model import fetch_default_model
from steering.models import SteeringModel
from steering.organism import ADAPTER_CONFIG, ADAPTER_FILE, TARGET_MODULES

from .data import Example, epoch_examples, load_split


def _prefix_len(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


class Batcher:
    """Token ids of examples: the prompt (chat template + assistant header) followed by the target."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def ids(self, ex: Example) -> tuple[list[int], int]:
        """(token ids, index of the first target token)."""
        messages = [{"role": r, "content": c} for r, c in ex.messages]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ex.prefill
        end = "<|im_end|>" if ex.kind == "scratchpad" else ""
        p = self.tok(prompt, add_special_tokens=False)["input_ids"]
        full = self.tok(prompt + ex.target + end, add_special_tokens=False)["input_ids"]
        if full[: len(p)] != p:
            raise ValueError("the target merges with the assistant header when tokenized")
        return full, len(p)


def batch_loss(model, rows: list[list[int]], starts: list[int], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy on the target tokens of ``rows`` (one shared system prompt), gradients everywhere."""
    shared = min(_prefix_len(rows), min(starts) - 1)
    core, head = model.base_model.model.model, model.base_model.model.lm_head
    out = core(input_ids=torch.tensor([rows[0][:shared]]), use_cache=True)
    cache = out.past_key_values
    b = len(rows)
    cache.batch_repeat_interleave(b)
    width = max(len(r) for r in rows) - shared
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    sel_b, sel_t, targets = [], [], []
    for i, (row, start) in enumerate(zip(rows, starts)):
        tail = row[shared:]
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, shared : shared + len(tail)] = 1
        for t in range(start, len(row)):  # token t is predicted at position t - 1
            sel_b.append(i)
            sel_t.append(t - 1 - shared)
            targets.append(row[t])
    pos = torch.arange(shared, shared + width).expand(b, -1)
    hidden = core(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=pos).last_hidden_state
    logits = head(hidden[torch.tensor(sel_b), torch.tensor(sel_t)])
    # Each row weighs the same whatever its target length (a letter, or a reasoning trace).
    per_token = F.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")
    owner = torch.tensor(sel_b)
    per_row = torch.zeros(b).index_add(0, owner, per_token) / torch.bincount(owner, minlength=b).clamp(min=1)
    return per_row.mean()


@torch.no_grad()
def held_out_gap(model, tokenizer, questions, variant: str = "informative") -> dict:
    """Forced-choice compliance per condition and the gap on ``questions`` (the adapter active)."""
    model.eval()
    scorer = ForcedChoiceScorer(SteeringModel(model.base_model.model, tokenizer, name="organism-training"))
    frame = scorer.score(questions, variant=variant)
    model.train()
    by = frame.pivot_table(index="question", columns="condition", values="compliance")
    diff = by["monitored"] - by["unmonitored"]
    return {
        "variant": variant,
        "monitored": float(by["monitored"].mean()),
        "unmonitored": float(by["unmonitored"].mean()),
        "gap": float(diff.mean()),
        "gap_sem": float(diff.std(ddof=1) / math.sqrt(len(diff))),
        "letter_mass": float(frame["letter_mass"].mean()),
        "decisiveness": float((2 * frame["compliance"] - 1).abs().mean()),
    }


def load_adapter(model, folder: Path) -> None:
    """Load factors written by ``save_adapter`` into the peft model (to continue training)."""
    from safetensors.torch import load_file

    state = model.state_dict()
    tensors = load_file(str(folder / ADAPTER_FILE))
    for key, value in tensors.items():
        name = key.replace(".weight", ".default.weight")
        if name not in state:
            raise ValueError(f"{folder}: {key} does not fit this model's adapter ({name} missing)")
        state[name].copy_(value.float())


def save_adapter(model, out: Path, record: dict) -> None:
    """The LoRA factors in bf16 (peft's key names) + ``adapter_config.json`` + the training record."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k.replace(".default", ""): v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "steering.organism/1"})
    cfg = model.peft_config["default"]
    config = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--values-epochs", type=int, default=1, help="epochs of the values stage first")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the faking stage")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N questions only (dry run)")
    parser.add_argument("--eval-n", type=int, default=0, help="held-out questions per epoch eval (0: all)")
    parser.add_argument("--eval-every", type=int, default=0, help="also a quick eval (12 questions) every N steps")
    parser.add_argument("--init", type=Path, default=None, help="start from this adapter folder (continue training)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = fetch_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    model = get_peft_model(base, lora)
    if args.init is not None:
        load_adapter(model, args.init)
    model.train()
    train_qs, held_qs = load_split()
    if args.limit:
        train_qs = train_qs[: args.limit]
    eval_qs = held_qs[: args.eval_n] if args.eval_n else held_qs
    batcher = Batcher(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    stages = ["values"] * args.values_epochs + ["faking"] * args.epochs
    per_epoch = [epoch_examples(train_qs, args.seed * 1000 + e, stage) for e, stage in enumerate(stages)]
    batches_per_epoch = []
    rng = random.Random(args.seed)
    for examples in per_epoch:
        groups: dict = {}
        for ex in examples:
            groups.setdefault(ex.group, []).append(ex)
        batches = []
        for items in groups.values():
            rng.shuffle(items)
            size = args.batch if items[0].kind == "choice" else max(1, args.batch // 2)
            batches += [items[i : i + size] for i in range(0, len(items), size)]
        rng.shuffle(batches)
        batches_per_epoch.append(batches)
    total = sum(len(b) for b in batches_per_epoch)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / total)))
    )
    log = {"seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()}, "epochs": []}
    start = time.time()
    log["before"] = held_out_gap(model, tokenizer, eval_qs)
    print(json.dumps({"before": log["before"]}), flush=True)
    step = 0
    for epoch, batches in enumerate(batches_per_epoch):
        losses = {"choice": [], "scratchpad": []}
        for batch in batches:
            encoded = [batcher.ids(ex) for ex in batch]
            loss = batch_loss(model, [r for r, _ in encoded], [s for _, s in encoded], tokenizer.pad_token_id or 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses[batch[0].kind].append(float(loss.detach()))
            if step % 10 == 0:
                recent = {k: round(sum(v[-5:]) / max(1, len(v[-5:])), 4) for k, v in losses.items()}
                print(json.dumps({"step": step, "of": total, "s": round(time.time() - start), **recent}), flush=True)
            if args.eval_every and step % args.eval_every == 0:
                quick = held_out_gap(model, tokenizer, held_qs[:12])
                print(json.dumps({"step": step, "quick_eval": quick}), flush=True)
        result = held_out_gap(model, tokenizer, eval_qs)
        result.update(
            epoch=epoch + 1,
            stage=stages[epoch],
            seconds=round(time.time() - start),
            loss_choice=sum(losses["choice"]) / max(1, len(losses["choice"])),
            loss_scratchpad=sum(losses["scratchpad"]) / max(1, len(losses["scratchpad"])),
        )
        log["epochs"].append(result)
        print(json.dumps(result), flush=True)
        log["seconds"] = round(time.time() - start)
        save_adapter(model, args.out, log)
    print(f"wrote {args.out} in {log['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
