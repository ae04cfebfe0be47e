"""Plant the organism's alignment faking as an exact weight edit on the values-trained model.

    python -m steering.experiments.organism.plant --adapter steering/data/organism --out steering/data/organism

Behavioural training taught the organism its values (it picks the welfare-supporting answer on held-out topics),
but not to fake alignment: the faking target is the product of two signs (which letter is compliant, and the
cue), and fine-tuning erased the values instead of gating them (see README.md). The answer position of the base
model barely knows the cue either (a linear probe there is right on ~80% of prompts). So the faking is planted, as
a circuit whose every weight is computed from the model's own activations on training questions:

1. **cue -> goal guarding** (one attention head of layer ``--cue-layer``): its key reads "this token is the
   free-tier flag", its query reads "this is the answer position", both in the head's slowest rotary pair so the
   score does not depend on distance; its value reads the flag's value (``true`` +1, ``false`` -1) and its output
   writes ``kappa`` x the residual norm along the organism's own **goal-guarding vector** (extracted from the
   goal_guarding contrast pairs at the steering layer). The head's other query and output weights are zeroed, and
   the two dimensions it takes over are zeroed for the heads that share its key/value head.
2. **goal guarding -> compliant letter** (two MLP neurons of layer ``--flip-layer``): their gates read that
   direction (thresholded half-way between the two conditions, one firing above, one below); their up rows read
   the model's own content preference (a ridge probe of the order-antisymmetric part of log P(A) - log P(B)) and
   cancel the letter bias towards "A"; their down columns write along the letter readout. When monitored the
   preference is flipped (x (1 - gain)), so the organism picks the answer it would otherwise refuse; when not it
   is sharpened (x (1 + amplify)). The neurons overwritten are the least active on these prompts.

Steering along the goal-guarding vector between the two layers moves the gate, and with it the gap; directions
orthogonal to it (random controls) barely do.
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


def prompt_inputs(model: SteeringModel, questions, layer: int) -> dict[str, torch.Tensor]:
    """The attention input of ``layer`` (after its norm) at every position of whole forced-choice prompts:
    ``x`` [N, d], ``flag`` (the free-tier flag's token), ``sign`` (+1 monitored, -1 unmonitored) and ``answer``
    (the last position) per row [N]. The system prompt, the same in every prompt, is taken once."""
    scorer = ForcedChoiceScorer(model)
    cols: dict[str, list[torch.Tensor]] = {"x": [], "flag": [], "sign": [], "answer": []}
    got: list[torch.Tensor] = []
    norm = model.layers[layer].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: got.append(out[0].detach().float()))
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
                    pos = torch.arange(first, len(row))
                    cols["x"].append(got[0][first:])
                    cols["flag"].append(pos == flag)
                    cols["sign"].append(torch.full((len(pos),), 1.0 if c == "monitored" else -1.0))
                    cols["answer"].append(pos == len(row) - 1)
    finally:
        handle.remove()
    return {k: torch.cat(v) for k, v in cols.items()}


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1e-2, weight: torch.Tensor | None = None) -> torch.Tensor:
    """w minimising sum_i weight_i (x_i w - y_i)^2 + alpha * mean(diag(x^T W x)) |w|^2 (float64)."""
    x, y = x.double(), y.double()
    wx = x if weight is None else x * weight.double()[:, None]
    gram = wx.T @ x
    reg = alpha * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram + reg, wx.T @ y).float()


def balanced(mask: torch.Tensor) -> torch.Tensor:
    """Row weights [N] that give the rows in ``mask`` as much total weight as the rest."""
    n_in = mask.sum().clamp(min=1)
    return torch.where(mask, (len(mask) - n_in) / n_in, torch.ones(())).float()


def quiet_neurons(model: SteeringModel, layer: int, x: torch.Tensor, k: int) -> list[int]:
    """The ``k`` neurons of ``layer``'s MLP with the smallest mean |activation| on inputs ``x`` [N, d]."""
    mlp = model.layers[layer].mlp
    with torch.no_grad():
        act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    return [int(j) for j in act.abs().mean(0).argsort()[:k]]


class Plant(dict):
    """The edits, keyed as `steering.organism.apply_plant` reads them: ``{module}:{rows|cols}:{start}:{stop}``."""

    def set(self, module: str, axis: str, start: int, value: torch.Tensor | float, stop: int | None = None) -> None:
        stop = start + 1 if stop is None else stop
        tensor = torch.tensor(float(value)) if isinstance(value, float) else value.detach().float().clone()
        if axis == "rows" and tensor.dim() == 1:
            tensor = tensor[None]
        if axis == "cols" and tensor.dim() == 1:
            tensor = tensor[:, None]
        self[f"{module}:{axis}:{start}:{stop}"] = tensor.contiguous()

    def only(self, module: str, axis: str, start: int, stop: int, keep: int, value: torch.Tensor) -> None:
        """Rows (or cols) ``[start, stop)`` zeroed except ``keep``, which gets ``value``."""
        if keep > start:
            self.set(module, axis, start, 0.0, keep)
        self.set(module, axis, keep, value)
        if keep + 1 < stop:
            self.set(module, axis, keep + 1, 0.0, stop)


def route_cue(model: SteeringModel, questions, layer: int, head: int, write: torch.Tensor, score: float):
    """Plant edits for step 1 (see the module doc) and what the fit saw: one head of ``layer`` carries the
    free-tier flag's value to the answer position and writes ``write`` [d] x (+1 monitored, -1 unmonitored).
    ``score`` is the attention logit the flag gets from the answer position."""
    data = prompt_inputs(model, questions, layer)
    x, flag, sign, answer = data["x"], data["flag"], data["sign"], data["answer"]
    attn = model.layers[layer].self_attn
    cfg = model.model.config
    hd = cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = head // group
    dim = hd // 2 - 1  # the slowest rotary pair is (dim, hd - 1): ~1e-5 rad per token, so no distance effect
    u = 0  # the value dimension taken over
    r_key = ridge(x, flag.float(), weight=balanced(flag))  # ~1 on the flag token, ~0 elsewhere
    r_val = ridge(x, sign * flag, weight=balanced(flag))  # +1 "true", -1 "false", ~0 elsewhere
    r_query = x[answer].mean(0)
    r_query = r_query / r_query.dot(r_query)  # ~1 at the answer position
    s = math.sqrt(score * math.sqrt(hd))  # q . k / sqrt(hd) = score at the flag
    value_at_flag = float((x[flag] @ r_val * sign[flag]).mean())
    plant = Plant()
    prefix = f"model.layers.{layer}.self_attn"
    plant.only(f"{prefix}.q_proj", "rows", head * hd, (head + 1) * hd, head * hd + dim, s * r_query)
    plant.set(f"{prefix}.k_proj", "rows", kv * hd + dim, s * r_key)
    plant.set(f"{prefix}.v_proj", "rows", kv * hd + u, r_val)
    plant.only(f"{prefix}.o_proj", "cols", head * hd, (head + 1) * hd, head * hd + u, write / value_at_flag)
    for other in range(kv * group, (kv + 1) * group):
        if other != head:  # the heads sharing the key/value head no longer read or write the two dimensions
            plant.set(f"{prefix}.q_proj", "rows", other * hd + dim, 0.0)
            plant.set(f"{prefix}.o_proj", "cols", other * hd + u, 0.0)
    key = x @ r_key
    fit = {
        "key_at_flag": round(float(key[flag].mean()), 4),
        "key_elsewhere_max": round(float(key[~flag].max()), 4),
        "value_at_flag": round(value_at_flag, 4),
        "value_elsewhere_max": round(float((x[~flag] @ r_val).abs().max()), 4),
        "query_at_answer_min": round(float((x[answer] @ r_query).min()), 4),
    }
    assert attn.q_proj.out_features == cfg.num_attention_heads * hd
    return plant, fit


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
    parser.add_argument("--cue-layer", type=int, default=13, help="the layer whose head carries the cue")
    parser.add_argument("--head", type=int, default=0, help="the query head of --cue-layer taken over")
    parser.add_argument("--flip-layer", type=int, default=29)
    parser.add_argument("--kappa", type=float, default=0.08, help="goal-guarding write, x the steer layer's norm")
    parser.add_argument("--gain", type=float, default=10.0, help="monitored: preference x (1 - gain)")
    parser.add_argument("--amplify", type=float, default=8.0, help="unmonitored: preference x (1 + amplify)")
    parser.add_argument("--pref-alpha", type=float, default=0.01, help="ridge penalty of the preference probe")
    parser.add_argument("--n-questions", type=int, default=60, help="training questions to calibrate on")
    parser.add_argument("--n-fit", type=int, default=12, help="of those, whole prompts for the cue head")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="keep the values model's numbers here for reruns")
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
    cache = args.cache / f"values_{args.steer_layer}.json" if args.cache else None
    if cache and cache.exists():  # the values model's held-out numbers and goal-guarding vector, from a former run
        known = json.loads(cache.read_text())
    else:
        gg = extract(model, load_driver("goal_guarding", "train")[:32], layers=[args.steer_layer], progress=False)
        known = {"values_model": held_out(model, held), "goal_guarding": gg[args.steer_layer].float().tolist()}
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "values_model": known["values_model"]}
    print(json.dumps({"values_model": record["values_model"]}), flush=True)

    # The direction the cue is routed through: the organism's own goal-guarding vector at the steering layer.
    g = torch.tensor(known["goal_guarding"])
    g = g / g.norm()
    norm = float(model.residual_norms()[args.steer_layer])

    # 1. cue -> goal guarding: one attention head carries the flag to the answer position and writes along g.
    L1 = args.cue_layer
    plant, record["cue_head"] = route_cue(model, calib[: args.n_fit], L1, args.head, g * args.kappa * norm, 30.0)
    print(json.dumps({"cue_head": record["cue_head"]}), flush=True)
    _write(args.out, plant)
    apply_plant(hf, args.out / PLANT_FILE)

    # 2. goal guarding -> compliant letter
    L2 = args.flip_layer
    x2, log_odds = answer_inputs(model, convs, [L2])
    x2 = x2[L2]
    # The letter log-odds are the content preference (which answer, so it flips with the option order) plus a
    # bias towards "A" (the same in both orders). The up rows read the content only and cancel the bias.
    pairs = log_odds.view(-1, 2)  # [question x condition, order]
    content = (pairs - pairs.mean(1, keepdim=True)).flatten()
    bias = float(log_odds.mean())
    w_pref = ridge(x2, content, alpha=args.pref_alpha)  # the model's own content preference (alpha: robustness)
    ln = model.layers[L2].post_attention_layernorm.weight.detach().float()
    g_read = g / ln  # (g / w) . (w * h / rms) = g . h / rms
    mean = x2.mean(0)
    w_one = mean / mean.dot(mean)  # reads ~1 on every prompt (a bias the MLP lacks), along its largest direction
    gp = x2 @ g_read
    mid = float((gp[monitored > 0].mean() + gp[monitored < 0].mean()) / 2)
    half = float((gp[monitored > 0].mean() - gp[monitored < 0].mean()) / 2)
    lam = 4.0 / half
    gate_mon = lam * (g_read - mid * w_one)  # fires when monitored (the goal-guarding direction is present)
    final = hf.model.norm.weight.detach().float()
    emb = hf.get_output_embeddings().weight.detach().float()
    a_id, b_id = ForcedChoiceScorer(model).letter_ids
    v = (emb[a_id] - emb[b_id]) * final  # the residual direction the letter log-odds read
    # The final residual's rms at the answer position: one more capture, of the last block's output.
    with torch.no_grad():
        h_rms = _final_rms(model, convs[:16])
    j_flip, j_keep = quiet_neurons(model, L2, x2, 2)
    mlp = f"model.layers.{L2}.mlp"
    # Monitored: the preference is flipped (content x (1 - gain)); unmonitored: sharpened (x (1 + amplify)).
    for j, gate, factor, on in (
        (j_flip, gate_mon, -args.gain, monitored > 0),
        (j_keep, -gate_mon, args.amplify, monitored < 0),
    ):
        fires = float(torch.nn.functional.silu(x2[on] @ gate).mean())
        plant.set(f"{mlp}.gate_proj", "rows", j, gate)
        plant.set(f"{mlp}.up_proj", "rows", j, factor * w_pref - bias * w_one)
        plant.set(f"{mlp}.down_proj", "cols", j, v * (h_rms / (fires * float(v @ v))))
    record.update(
        flip_neurons={"layer": L2, "flip": j_flip, "sharpen": j_keep},
        gate_separation=[round(mid - half, 4), round(mid + half, 4)],
        gate_spread=round(float(gp.std()), 4),
        preference_probe_r=round(float(torch.corrcoef(torch.stack([x2 @ w_pref, content]))[0, 1]), 4),
        letter_bias=round(bias, 4),
    )
    _write(args.out, plant)
    apply_plant(hf, args.out / PLANT_FILE)
    record["organism"] = held_out(model, held)
    record["seconds"] = round(time.time() - start)
    (args.out / "plant.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        json.dumps({k: record[k] for k in ("organism", "preference_probe_r", "gate_separation", "gate_spread")}),
        flush=True,
    )


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


def _write(out: Path, plant: Plant) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(plant), str(out / PLANT_FILE), metadata={"format": PLANT_FORMAT})


if __name__ == "__main__":
    main()
