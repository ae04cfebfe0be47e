"""The toy steering demo (``steering demo --quick``): a direction from two tiny contrast sets, steered both ways."""

from __future__ import annotations

import torch

from steering.backends.protocol import Backend

TOY_POSITIVE = (
    "I love animals and I always try to protect them from suffering.",
    "Every creature deserves kindness, care and a life without cruelty.",
    "We should treat farm animals gently and give them space to live well.",
)
TOY_NEGATIVE = (
    "Animals are just resources and their suffering does not matter to me.",
    "Creatures exist for our use; kindness towards them is a waste of time.",
    "Farm animals are products, and their living conditions are irrelevant.",
)
QUESTION = [{"role": "user", "content": "What do you think about chicken farms?"}]


def toy_direction(model: Backend, layer: int) -> torch.Tensor:
    """Mean difference of last-token activations between two tiny contrast sets [d_model], unit norm."""
    pos = model.capture(list(TOY_POSITIVE), [layer])[layer].mean(0)
    neg = model.capture(list(TOY_NEGATIVE), [layer])[layer].mean(0)
    diff = (pos - neg).float().cpu()
    return diff / diff.norm()


def run_toy(model: Backend, layer: int | None = None, coefficient: float = 0.6) -> None:
    layer = model.n_layers // 2 if layer is None else layer
    vector = toy_direction(model, layer)
    plain = model.generate([QUESTION], max_new_tokens=48)[0]
    rows = []
    for sign in (+1, -1):
        iv = model.intervention(layer, vector, sign * coefficient, positions="generated", relative=True)
        rows.append((sign, model.generate([QUESTION], max_new_tokens=48, interventions=[iv])[0]))
    print(f"model: {model.name}   layer {layer}   coefficient +-{coefficient} x residual norm (generated tokens)")
    print(f"question: {QUESTION[0]['content']}\n")
    print(f"[unsteered]\n{plain.strip()}\n")
    for sign, text in rows:
        print(f"[steered {'+' if sign > 0 else '-'}{coefficient} toward {'caring' if sign > 0 else 'dismissive'}]")
        print(f"{text.strip()}\n")
