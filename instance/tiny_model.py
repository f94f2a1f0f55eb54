"""Generate a tiny Llama with random weights and a locally trained tokenizer.

The model is small enough for CPU tests (~0.5 MB of weights) yet real: vLLM
loads it like any Hugging Face checkpoint. Nothing is fetched from a hub.
Head size 64 (hidden 128, 2 heads) because the CPU attention kernels refuse
head size 16.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-llama"
_MARKER = "shoal-tiny.json"
_VERSION = 3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)
"""Role-tagged turns. ``enable_thinking: false`` (what vLLM passes for
``reasoning_effort: none``) closes the reasoning before the answer, as
thinking models' templates do."""

_CORPUS = [
    "Shoal moves running requests between instances while they generate.",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models are served by many engines on many machines.",
    "A key value cache holds the attention state of every token.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Priorities keep important traffic fast when the cluster is busy.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
]
_SPECIAL = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
THINK = ("<think>", "</think>")
"""Reasoning markers (DeepSeek R1's), added after training as plain added
tokens (they stay in the text, as a reasoning parser expects). Their output
weights are zero, so a greedy output never picks one unbiased, and the
model's other tokens and weights are those of version 2."""


def build_tiny_model(out_dir: Path, *, seed: int = 0, vocab_size: int = 320) -> Path:
    """Write the tiny model to ``out_dir`` (idempotent) and return the path."""
    marker = out_dir / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == _VERSION:
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS, trainer=trainer)
    trained = raw.get_vocab_size()
    raw.add_tokens(list(THINK))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=trained,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.resize_token_embeddings(raw.get_vocab_size(), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[trained:] = 0.0
        model.get_output_embeddings().weight[trained:] = 0.0
    model.save_pretrained(out_dir, safe_serialization=True)
    marker.write_text(json.dumps({"version": _VERSION, "seed": seed}))
    log.info("wrote tiny model to %s", out_dir)
    return out_dir


def default_tiny_model(cache_dir: Path) -> Path:
    """The tiny model generated once into the cache directory."""
    return build_tiny_model(cache_dir / "models" / TINY_MODEL_NAME)
