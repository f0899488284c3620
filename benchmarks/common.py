"""What the benchmarks share: the issue's reference model (6 layers, 6 heads, hidden 384, vocab 8192)
as command-line options, and the GPTConfig built from them."""

from __future__ import annotations

import argparse

from lm.model import GPTConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)


def model_config(args: argparse.Namespace, context: int, dropout: float = 0.0) -> GPTConfig:
    return GPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, max_position_embeddings=context, dropout=dropout)
