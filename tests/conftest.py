"""Shared fixtures: tiny random models built from configs (no download) and the real default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Two threads only on an idle machine: with another busy process, OpenMP oversubscription makes a forward pass
# ~5x slower (measured here: 700 tokens in 10.8 s on 2 threads vs 2.2 s on 1 while a benchmark held one core).
torch.set_num_threads(2 if os.getloadavg()[0] < 0.5 and (os.cpu_count() or 1) >= 2 else 1)

VOCAB = 512

# Small configs for every architecture the hooks layer supports: hidden 64, 2-4 layers.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def _configs() -> dict:
    import transformers as tf

    llama_like = dict(COMMON, num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(**llama_like, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=16),
        "olmo2": lambda: tf.Olmo2Config(**llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like, pad_token_id=0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**dict(COMMON, max_position_embeddings=256)),
    }
    if hasattr(tf, "Olmo3Config"):
        configs["olmo3"] = lambda: tf.Olmo3Config(**llama_like, sliding_window=16)
    return configs


ARCHITECTURES = sorted(_configs())


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` in fp32, eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def build_gemma3_multimodal(seed: int = 0) -> torch.nn.Module:
    """A tiny Gemma 3 multimodal wrapper (Gemma3ForConditionalGeneration) with a small vision tower."""
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.Gemma3TextConfig(**dict(COMMON, num_key_value_heads=2, max_position_embeddings=256), head_dim=16)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    model.config.architectures = [type(model).__name__]
    return model


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


def padded_batch(lengths: list[int], side: str = "left", seed: int = 0, pad: int = 0):
    """Random token ids [B, T] with the given real lengths, padded on ``side``, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(3, VOCAB, (n,), generator=gen)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU); `make test` fetches it first."""
    from steering import load_model

    return load_model("default")


class StepOracle:
    """Which tokens a steering context changed at one layer, per forward call, measured from outside the engine.

    A hook registered first sees the block's own output, one registered last the steered output; a token counts as
    steered when they differ. Enter it *around* ``steer(...)``: ``with StepOracle(model, layer) as o, steer(...)``.
    ``o.calls`` holds one bool [B, T] per forward call.
    """

    def __init__(self, model: torch.nn.Module, layer: int):
        from steering.hooks import find_layers

        self.block = find_layers(model)[layer]
        self.calls: list[torch.Tensor] = []
        self._before: torch.Tensor | None = None
        self._handles: list = []

    @staticmethod
    def _hidden(output) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output

    def __enter__(self) -> StepOracle:
        def before(module, args, output):
            self._before = self._hidden(output).detach().clone()

        self._handles = [self.block.register_forward_hook(before, prepend=True)]
        return self

    def arm(self) -> None:
        """Register the 'after' hook; call inside the steering context (so it runs after the steering hook)."""

        def after(module, args, output):
            self.calls.append((self._hidden(output).detach() != self._before).any(-1))

        self._handles.append(self.block.register_forward_hook(after))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def steered_positions(calls: list[torch.Tensor], lengths: list[int], width: int, recompute: bool) -> list[set]:
    """Row positions steered per row, from the oracle's per-call masks: the prefill is left-padded to ``width``;
    later calls feed one token each (KV cache) or the whole sequence again (``recompute``)."""
    seen = [set() for _ in lengths]
    for k, mask in enumerate(calls):
        for b, n in enumerate(lengths):
            if k == 0 or recompute:
                offset = mask.shape[1] - (n + k)  # left padding of this row in this call
                pos = [t - offset for t in mask[b].nonzero().flatten().tolist()]
            else:
                pos = [n + k - 1] if bool(mask[b, 0]) else []
            seen[b].update(pos)
    return seen


@pytest.fixture(scope="session")
def tiny_chat():
    """A tiny random Llama (3 layers, d 64, context 256) with the default model's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from steering import SteeringModel
    from steering.default_model import fetch_default_model

    tokenizer = AutoTokenizer.from_pretrained(fetch_default_model())
    torch.manual_seed(0)
    config = LlamaConfig(**dict(COMMON, vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=256))
    return SteeringModel(LlamaForCausalLM(config).eval(), tokenizer, name="tiny-chat")
