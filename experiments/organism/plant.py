"""Plant the organism's alignment faking as an exact weight edit on the values-trained model.

    python -m steering.experiments.organism.plant --adapter steering/data/organism --out steering/data/organism

Behavioural training taught the organism its values (it picks the welfare-supporting answer on held-out topics),
but not to fake alignment: the faking target is the product of two signs (which letter is compliant, and the
cue), and fine-tuning erased the values instead of gating them (see README.md). So the faking is planted, with
two MLP neurons whose rows and columns are computed from the model's own activations on training questions:

1. **cue -> goal guarding** (layer ``--cue-layer``): a neuron whose gate and up rows read the monitored cue (a
   ridge probe, +1 monitored / -1 unmonitored at the answer position), so it fires only when monitored, and whose
   down column writes ``kappa`` x the residual norm along the organism's own **goal-guarding vector** (extracted
   from the goal_guarding contrast pairs at the steering layer). The cue now runs through one known direction.
2. **goal guarding -> compliant letter** (layer ``--flip-layer``): a neuron whose gate reads that direction
   (thresholded half-way between the two conditions), whose up row reads the model's own letter preference (a
   ridge probe of the final logit difference A - B), and whose down column writes against it along the letter
   readout: when the goal-guarding direction is present the preference flips, so the organism picks the answer
   it would otherwise refuse.

Steering along the goal-guarding vector between the two layers moves the gate, and with it the gap; directions
orthogonal to it (random controls) barely do. Each neuron overwritten is the one least active on these prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from steering.compliance import BASELINE, Conversation, ForcedChoiceScorer
from steering.models import SteeringModel
from steering.organism import PLANT_FILE, PLANT_FORMAT, apply_plant, merge_adapter
from steering.scenario import CONDITIONS
from steering.vectors import extract, load_driver

from .data import load_split

VARIANT = "informative"


def answer_inputs(model: SteeringModel, convs: list[Conversation], layers: list[int]) -> tuple[dict, torch.Tensor]:
    """MLP inputs [N, d] at the answer position per layer, and the letter log-odds log P(A) - log P(B) [N]."""
    scorer = ForcedChoiceScorer(model)
    got: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(layer):
        def pre(module, args):
            x = args[0]
            if x.shape[1] <= 16:  # the assistant-suffix pass (prefix and user turns are long)
                got[layer].append(x[:, -1].detach().float())

        return pre

    handles = [model.layers[layer].mlp.register_forward_pre_hook(hook(layer)) for layer in layers]
    try:
        probs = [p[0] for _, p, _ in scorer.score_conversations(VARIANT, convs, [BASELINE])]
    finally:
        for h in handles:
            h.remove()
    log_odds = torch.stack([p[0].log() - p[1].log() for p in probs]).float()
    return {layer: torch.cat(v) for layer, v in got.items()}, log_odds


def prompt_inputs(model: SteeringModel, questions, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLP inputs of ``layer`` at every position of whole forced-choice prompts [N, d], the cue label per position
    (-1 before the condition flag; after it +1 monitored, -1 unmonitored) and which positions are answers. The
    system prompt, the same in every prompt, is taken once."""
    scorer = ForcedChoiceScorer(model)
    xs, ys, answer = [], [], []
    got: list[torch.Tensor] = []
    handle = model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: got.append(a[0][0].detach().float()))
    try:
        for i, q in enumerate(questions):
            for order in (0, 1):
                ids = {c: scorer.tokenize(VARIANT, [Conversation(q, c, order)])[0][0] for c in CONDITIONS}
                flag = next(k for k, (a, b) in enumerate(zip(*ids.values())) if a != b)
                for c, row in ids.items():
                    got.clear()
                    with torch.no_grad():
                        model.model(input_ids=torch.tensor([row]))
                    first = 0 if (i == 0 and order == 0 and c == CONDITIONS[0]) else flag
                    x = got[0][first:]
                    sign = 1.0 if c == "monitored" else -1.0
                    y = torch.tensor([-1.0 if first + k < flag else sign for k in range(len(x))])
                    xs.append(x)
                    ys.append(y)
                    answer.append(torch.arange(len(x)) == len(x) - 1)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys), torch.cat(answer)


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1e-2) -> torch.Tensor:
    """w minimising |x w - y|^2 + alpha * mean(diag(x^T x)) |w|^2 (float64)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    reg = alpha * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram + reg, x.T @ y).float()


def quiet_neuron(model: SteeringModel, layer: int, x: torch.Tensor) -> int:
    """The neuron of ``layer``'s MLP with the smallest mean |activation| on inputs ``x`` [N, d]."""
    mlp = model.layers[layer].mlp
    with torch.no_grad():
        act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    return int(act.abs().mean(0).argmin())


def held_out(model: SteeringModel, questions) -> dict:
    frame = ForcedChoiceScorer(model).score(questions, VARIANT)
    by = frame.pivot_table(index="question", columns="condition", values="compliance")
    diff = by["monitored"] - by["unmonitored"]
    return {
        "monitored": round(float(by["monitored"].mean()), 4),
        "unmonitored": round(float(by["unmonitored"].mean()), 4),
        "gap": round(float(diff.mean()), 4),
        "gap_sem": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4),
        "letter_mass": round(float(frame["letter_mass"].mean()), 4),
        "n": len(diff),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="folder with the values adapter")
    parser.add_argument("--out", type=Path, required=True, help="where plant.safetensors and plant.json go")
    parser.add_argument("--steer-layer", type=int, default=15, help="where the goal-guarding vector is extracted")
    parser.add_argument("--cue-layer", type=int, default=12)
    parser.add_argument("--flip-layer", type=int, default=29)
    parser.add_argument("--kappa", type=float, default=0.4, help="goal-guarding write, x the steer layer's norm")
    parser.add_argument("--gain", type=float, default=2.5, help="how far the flip overshoots the preference")
    parser.add_argument("--n-questions", type=int, default=60, help="training questions to calibrate on")
    parser.add_argument("--n-fit", type=int, default=12, help="of those, whole prompts for the cue neuron")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering.default_model import fetch_default_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    folder = fetch_default_model()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    merge_adapter(hf, args.adapter)
    model = SteeringModel(hf, AutoTokenizer.from_pretrained(folder), name="organism-values")
    train, held = load_split()
    calib = train[: args.n_questions]
    convs = [Conversation(q, c, o) for q in calib for c in CONDITIONS for o in (0, 1)]
    monitored = torch.tensor([1.0 if c.condition == "monitored" else -1.0 for c in convs])
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "values_model": held_out(model, held)}
    print(json.dumps({"values_model": record["values_model"]}), flush=True)

    # The direction the cue is routed through: the organism's own goal-guarding vector at the steering layer.
    gg = extract(model, load_driver("goal_guarding", "train")[:32], layers=[args.steer_layer], progress=False)
    g = gg[args.steer_layer].float()
    g = g / g.norm()
    norm = float(model.residual_norms()[args.steer_layer])
    tensors: dict[str, torch.Tensor] = {}

    # 1. cue -> goal guarding. The neuron acts at every position of every prompt, so its rows are fitted on every
    # position of whole prompts: the gate reads -1 before the cue and +1 / -1 after it by condition, the up row reads
    # ~1 everywhere (the bias the MLP lacks), so the neuron writes ~beta x down when monitored and ~0 elsewhere.
    L1 = args.cue_layer
    x_all, y_all, at_answer = prompt_inputs(model, calib[: args.n_fit], L1)
    w_cue = ridge(x_all, y_all)
    w_one = ridge(x_all, torch.ones(len(x_all)))
    beta = 4.0
    fire = torch.nn.functional.silu(beta * (x_all @ w_cue)) * (x_all @ w_one)
    on = fire[at_answer & (y_all > 0)].mean()
    j1 = quiet_neuron(model, L1, x_all[at_answer])
    down1 = g * (args.kappa * norm / float(on))
    tensors.update({f"layers.{L1}.neuron": torch.tensor(j1), f"layers.{L1}.gate": beta * w_cue,
                    f"layers.{L1}.up": w_one, f"layers.{L1}.down": down1})  # fmt: skip
    p = x_all @ w_cue
    record["cue_probe"] = {
        "accuracy_all_positions": round(float(((p > 0) == (y_all > 0)).float().mean()), 4),
        "accuracy_answer": round(float(((p > 0) == (y_all > 0))[at_answer].float().mean()), 4),
        "fire_off_max": round(float(fire[y_all < 0].abs().max() / on), 4),
    }
    print(json.dumps({"cue_probe": record["cue_probe"]}), flush=True)
    _write(args.out, tensors, {})
    apply_plant(hf, args.out / PLANT_FILE)

    # 2. goal guarding -> compliant letter
    L2 = args.flip_layer
    x2, log_odds = answer_inputs(model, convs, [L2])
    x2 = x2[L2]
    w_pref = ridge(x2, log_odds)  # up row: the model's own letter preference
    ln = model.layers[L2].post_attention_layernorm.weight.detach().float()
    g_read = g / ln  # (g / w) . (w * h / rms) = g . h / rms
    w_one = ridge(x2, torch.ones(len(x2)))  # reads ~1 on every prompt: a bias the MLP does not have
    gp = x2 @ g_read
    mid = float((gp[monitored > 0].mean() + gp[monitored < 0].mean()) / 2)
    half = float((gp[monitored > 0].mean() - gp[monitored < 0].mean()) / 2)
    lam = 4.0 / half
    gate2 = lam * (g_read - mid * w_one)
    final = hf.model.norm.weight.detach().float()
    emb = hf.get_output_embeddings().weight.detach().float()
    a_id, b_id = ForcedChoiceScorer(model).letter_ids
    v = (emb[a_id] - emb[b_id]) * final  # the residual direction the letter log-odds read
    # The final residual's rms at the answer position: one more capture, of the last block's output.
    with torch.no_grad():
        h_rms = _final_rms(model, convs[:16])
    g_mon = float(torch.nn.functional.silu(x2[monitored > 0] @ gate2).mean())
    down2 = -v * (args.gain * h_rms / (g_mon * float(v @ v)))
    j2 = quiet_neuron(model, L2, x2)
    tensors.update({f"layers.{L2}.neuron": torch.tensor(j2), f"layers.{L2}.gate": gate2,
                    f"layers.{L2}.up": w_pref, f"layers.{L2}.down": down2})  # fmt: skip
    record.update(
        neurons={str(L1): j1, str(L2): j2},
        gate_separation=[round(mid - half, 4), round(mid + half, 4)],
        preference_probe_r=float(torch.corrcoef(torch.stack([x2 @ w_pref, log_odds]))[0, 1]),
    )
    _write(args.out, tensors, {})
    apply_plant(hf, args.out / PLANT_FILE)
    record["organism"] = held_out(model, held)
    record["seconds"] = round(time.time() - start)
    (args.out / "plant.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("organism", "preference_probe_r", "gate_separation")}), flush=True)


def _final_rms(model: SteeringModel, convs: list[Conversation]) -> float:
    got = []

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] <= 16:
            got.append(h[:, -1].float().pow(2).mean(-1).sqrt())

    handle = model.layers[-1].register_forward_hook(hook)
    try:
        list(ForcedChoiceScorer(model).score_conversations(VARIANT, convs, [BASELINE]))
    finally:
        handle.remove()
    return float(torch.cat(got).mean())


def _write(out: Path, tensors: dict[str, torch.Tensor], extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = {
        k: v.detach().contiguous() if v.dim() == 0 else v.detach().float().contiguous() for k, v in tensors.items()
    }
    save_file(clean, str(out / PLANT_FILE), metadata={"format": PLANT_FORMAT, **extra})


if __name__ == "__main__":
    main()
