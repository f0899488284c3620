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


def fine_tuning_run(parser: argparse.ArgumentParser, default_workdir: str) -> tuple[argparse.Namespace, list[str]]:
    """The fine-tuning benchmarks' common options (--backbone, --workdir, --threads): parse them, set the
    threads, resolve the backbone to an absolute path, move into the scratch folder and print the CPU."""
    import os
    import platform
    from pathlib import Path

    import torch

    parser.add_argument("--backbone", required=True, help="an `lm fit` checkpoint")
    parser.add_argument("--workdir", default=default_workdir, help="scratch folder for logs/ and checkpoints/")
    parser.add_argument("--threads", type=int, default=None)
    args, extra = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backbone = str(Path(args.backbone).resolve())
    args.workdir = Path(args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()} "
          f"(load average {os.getloadavg()[0]:.1f}: a shared machine makes figures noisy)")
    return args, extra
