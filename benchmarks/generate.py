"""Decode speed of `lm.model.generate`: KV cache vs re-running the sequence, fp32 vs bf16.

    python benchmarks/generate.py                      # defaults: the 6x6x384 / vocab 8192 model
    python benchmarks/generate.py --runs 5 --threads 1 --dtypes float32

Measures batch-1 decode tokens/s (prefill excluded: the clock starts at the first generated token)
on a randomly initialized model with greedy decoding, after a warm-up run; reports the median of
`--runs` runs and the speed-up of the cache over the no-cache path. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.model import GPT, GPTConfig, stream_generate  # noqa: E402


def decode_tokens_per_second(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> float:
    """Tokens/s from the first generated token to the last (the prompt's prefill is not counted)."""
    stream = stream_generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
    next(stream)  # prefill + first token
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256, help="max_position_embeddings")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) no-cache runs")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, max_position_embeddings=args.context)
    prompt = torch.randint(0, args.vocab, (args.prompt_tokens,)).tolist()
    print(f"model: {args.layers} layers, {args.heads} heads, hidden {args.hidden}, vocab {args.vocab}, "
          f"context {args.context}; batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"greedy; {torch.get_num_threads()} threads; median of {args.runs} runs after a warm-up\n")
    print("| dtype | KV cache (tok/s) | no cache (tok/s) | speed-up |")
    print("|---|---:|---:|---:|")
    for dtype_name in args.dtypes:
        model = GPT(config).to(getattr(torch, dtype_name)).eval()
        results = {}
        for use_cache in ([True] if args.no_baseline else [True, False]):
            decode_tokens_per_second(model, prompt, args.new_tokens, use_cache)  # warm-up
            runs = [decode_tokens_per_second(model, prompt, args.new_tokens, use_cache) for _ in range(args.runs)]
            results[use_cache] = statistics.median(runs)
        cached, uncached = results[True], results.get(False)
        no_cache = f"{uncached:.0f}" if uncached else "-"
        speedup = f"{cached / uncached:.1f}x" if uncached else "-"
        print(f"| {dtype_name} | {cached:.0f} | {no_cache} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
