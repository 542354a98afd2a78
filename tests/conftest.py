"""Shared fixtures: tiny models built from a config (no hub, no download)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte) and a ChatML template.

    Built as a `Qwen2Tokenizer`, the class transformers 5 reloads for a saved `model_type=qwen2`, so
    save/reload next to a tiny Qwen2 model keeps the same ids (test_tiny_tokenizer_round_trips).
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, arch: str = "qwen2", tied: bool = True
):
    """A random causal LM from a config: Qwen2 (q/k/v biases) or Llama (no biases), tied output or not."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen2-architecture model and tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def load_stopped_on(monkeypatch):
    """`load_stopped_on(device)`: `load_model` runs as on that device (transformers backend) and is stopped where
    it calls `from_pretrained`; returns a dict that receives the path and whether a 4-bit config was passed."""
    import torch
    import transformers

    import sdpo_unsloth.model as model_module
    from sdpo_unsloth.bootstrap import Backend

    seen: dict = {}

    def stop(path, **kwargs):
        seen.update(path=path, load_in_4bit="quantization_config" in kwargs)
        raise RuntimeError("stop here")

    def pretend(device: str) -> dict:
        monkeypatch.setattr(model_module, "bootstrap", lambda *a: Backend("transformers", device, "test"))
        monkeypatch.setattr(model_module, "_resolve_path", lambda name: name)  # no embedded conversion
        monkeypatch.setattr(model_module, "pick_dtype", lambda *a: torch.float16)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stop)
        return seen

    return pretend
