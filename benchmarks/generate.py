"""Decode speed of `lm.model.generation`: KV cache vs re-running the sequence, fp32 vs bf16, and the
inference paths of `GPT.prepare_for_inference` (lm/model/inference.py: decode routes for the linear
layers, bf16 prepacked weights, a compiled decode step).

    python benchmarks/generate.py                          # the 6x6x384 / vocab 8192 model, 1 and 2 threads
    python benchmarks/generate.py --runs 5 --threads 1 --dtypes float32 --paths eager compiled
    python benchmarks/generate.py --runs 5 --threads 2 --no-baseline --hf --batch 8   # 8 prompts at once

Measures decode tokens/s (prefill excluded: the clock starts at the first generated token; `--batch N`
decodes N different prompts of the same length together and counts every row's tokens)
on a randomly initialized model with greedy decoding, after a warm-up run (which also pays any
compile time, reported as "setup"); reports the median of `--runs` runs, the speed-up of each path
over the no-cache path, and the load average (other processes on the machine skew the numbers:
measure when `uptime` is low). Also checks that every path decodes the same tokens as plain eager.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import add_model_arguments, model_config  # noqa: E402
from lm.runtime.hardware import auto_inference_dtype, describe_cpu  # noqa: E402
from lm.model import GPT, GPTConfig, generate, stream_generate  # noqa: E402

PATHS = {
    "eager": "plain eager model (nn.Linear everywhere)",
    "prepared": "prepare_for_inference(): decode routes for the linear layers (fp32: padded matmul; "
                "bf16: oneDNN-prepacked weights where oneDNN has bf16), what `lm generate` runs",
    "compiled": "prepare_for_inference(compile=True): the same plus a torch.compile'd decode step",
}


def decode_tokens_per_second(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool,
                             repetition_penalty: float = 1.0) -> float:
    """Tokens/s from the first generated token to the last (the prompt's prefill is not counted)."""
    stream = stream_generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache,
                             repetition_penalty=repetition_penalty)
    next(stream)  # prefill + first token
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return count / (time.perf_counter() - start)


def batch_decode_tokens_per_second(model: GPT, prompts: list[list[int]], new_tokens: int,
                                   repetition_penalty: float = 1.0) -> float:
    """Tokens/s of every row together, from the first generated token to the last: `generate` of
    `new_tokens` minus `generate` of 1 (the prefill and the first token), timed back to back."""
    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=tokens, temperature=0.0, repetition_penalty=repetition_penalty)
        return time.perf_counter() - start

    first = seconds(1)
    return len(prompts) * (new_tokens - 1) / (seconds(new_tokens) - first)


def lm_tokens_per_second(model: GPT, prompts: list[list[int]], new_tokens: int, use_cache: bool,
                         repetition_penalty: float) -> float:
    """One prompt: the streaming clock (`decode_tokens_per_second`); several: `batch_decode_tokens_per_second`
    (the KV-cache path only: `main` refuses --batch without --no-baseline)."""
    if len(prompts) == 1:
        return decode_tokens_per_second(model, prompts[0], new_tokens, use_cache, repetition_penalty)
    return batch_decode_tokens_per_second(model, prompts, new_tokens, repetition_penalty)


def hf_decode_tokens_per_second(model, prompts: list[list[int]], new_tokens: int, repetition_penalty: float) -> float:
    """The same clock for Hugging Face transformers' `generate` (greedy, its KV cache): a streamer notes
    the time of every token it is handed; the first `put` is the prompt, the second the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    ids = torch.tensor(prompts)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, repetition_penalty=repetition_penalty, streamer=clock, pad_token_id=0)
    first_new, last = clock.times[1], clock.times[-1]
    return len(prompts) * (len(clock.times) - 2) / (last - first_new)


def hf_gpt2(config: GPTConfig, dtype: torch.dtype):
    """transformers' `GPT2LMHeadModel` of the same shape (random weights), as its users run it: eager
    PyTorch (no torch.compile), its default attention. A test extra: `pip install transformers`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_position_embeddings,
                           n_embd=config.hidden_size, n_layer=config.num_hidden_layers,
                           n_head=config.num_attention_heads, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(hf_config).to(dtype).eval()


def hf_tokens_per_second(config: GPTConfig, dtype: torch.dtype, prompts: list[list[int]],
                         args: argparse.Namespace) -> float:
    """Median decode tokens/s of `hf_gpt2(config, dtype)` over `args.runs` runs after a warm-up."""
    peer = hf_gpt2(config, dtype)
    hf_decode_tokens_per_second(peer, prompts, args.new_tokens, args.repetition_penalty)  # warm-up
    return statistics.median(hf_decode_tokens_per_second(peer, prompts, args.new_tokens, args.repetition_penalty)
                             for _ in range(args.runs))


def prepare(config: GPTConfig, dtype: torch.dtype, path: str) -> tuple[GPT, float]:
    torch.manual_seed(0)
    model = GPT(config).to(dtype).eval()
    start = time.perf_counter()
    if path != "eager":
        model.prepare_for_inference(compile=path == "compiled")
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--context", type=int, default=256, help="max_position_embeddings")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (tokens/s counts every row)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) no-cache runs")
    parser.add_argument("--hf", action="store_true",
                        help="add Hugging Face transformers' GPT2LMHeadModel.generate of the same shape (eager), "
                             "the peer the speed-ups are reported against (needs transformers)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="applied on both sides (lm generate's default is 1.2; HF's penalty looks at the "
                             "whole sequence, lm's at the last 64 tokens)")
    args = parser.parse_args()
    if args.batch > 1 and not args.no_baseline:
        parser.error("--batch > 1 measures the KV-cache paths only: add --no-baseline")

    config = model_config(args, context=args.context)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model: {args.layers} layers, {args.heads} heads, hidden {args.hidden}, vocab {args.vocab}, "
          f"context {args.context}; batch {args.batch}, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, "
          f"greedy; median of {args.runs} runs after a warm-up; load average at start "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"CPU: {describe_cpu()}\n")
    for name in args.paths:
        print(f"- {name}: {PATHS[name]}")
    if args.hf:
        print("- HF eager: transformers' GPT2LMHeadModel.generate, same shape and random weights, greedy, its KV "
              "cache, eager PyTorch (no torch.compile), default attention")
    print(f"\nrepetition penalty {args.repetition_penalty} on every row")
    print("\n| threads | dtype | path | KV cache (tok/s) | no cache (tok/s) | speed-up vs no cache | vs HF fp32 "
          "| setup (s) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        hf = None  # HF's float32 tokens/s at these threads: every row's "vs HF fp32" (fp32, as its users run it)
        for dtype_name in sorted(args.dtypes, key=lambda name: name != "float32"):  # float32 first
            dtype = getattr(torch, dtype_name)
            reference, uncached = None, None
            if args.hf:
                hf_here = hf_tokens_per_second(config, dtype, prompts, args)
                if hf is None:  # this row if float32, else measured once
                    hf = (hf_here if dtype_name == "float32"
                          else hf_tokens_per_second(config, torch.float32, prompts, args))
                print(f"| {threads} | {dtype_name} | HF eager | {hf_here:.0f} | | | {hf_here / hf:.1f}x | 0.0 |",
                      flush=True)
            for path in args.paths:
                model, setup = prepare(config, dtype, path)
                start = time.perf_counter()
                lm_tokens_per_second(model, prompts, args.new_tokens, True,
                                     args.repetition_penalty)  # warm-up (and compile)
                setup += time.perf_counter() - start if path == "compiled" else 0.0
                cached = statistics.median(lm_tokens_per_second(model, prompts, args.new_tokens, True,
                                                                args.repetition_penalty) for _ in range(args.runs))
                tokens = generate(model, prompts, max_new_tokens=args.new_tokens, temperature=0)
                if reference is None:
                    reference = tokens
                    if not args.no_baseline:
                        uncached = statistics.median(lm_tokens_per_second(model, prompts, args.new_tokens, False,
                                                                          args.repetition_penalty)
                                                     for _ in range(max(1, args.runs // 2)))
                same = "" if tokens == reference else " (tokens differ from eager!)"
                no_cache = f"{uncached:.0f}" if uncached and path == args.paths[0] else ""
                speedup = f"{cached / uncached:.1f}x" if uncached else "-"
                versus_hf = f"{cached / hf:.1f}x" if hf else ""
                print(f"| {threads} | {dtype_name} | {path}{same} | {cached:.0f} | {no_cache} | {speedup} | "
                      f"{versus_hf} | {setup:.1f} |", flush=True)
    dtype_name, why = auto_inference_dtype("cpu", decode_rows=args.batch)
    print(f"\nlm generate's default path on this CPU at batch {args.batch}: the {dtype_name} prepared row ({why}; "
          "not compiled)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
