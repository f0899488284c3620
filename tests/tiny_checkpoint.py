"""A tiny `lm` checkpoint written without a Trainer (what `lm fit` saves: config, weights, tokenizer),
shared by the fine-tuning and evaluation tests so they need no training run to start from."""

from __future__ import annotations

from pathlib import Path

import torch

from lm.io.checkpoints import save_model
from lm.data.tokenizer import Tokenizer
from lm.model import GPT, GPTConfig, build_gpt
from tests.conftest import make_corpus


def tiny_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return Tokenizer.train([make_corpus(30, 0)], vocab_size=vocab_size)


def tiny_gpt(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32)
    return build_gpt(GPTConfig(**{**fields, **overrides})).eval()


def write_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """The layout `lm.io.checkpoints.load_model` reads (and `lm fit` writes)."""
    return save_model(path, model, tokenizer)
