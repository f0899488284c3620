"""What quantization, pruning and distillation cost and buy, measured on one trained checkpoint.

    python benchmarks/compress.py --ckpt /work/artifacts/run/checkpoints/pretrain/last.ckpt \
        --students checkpoints/student-distilled/last.ckpt checkpoints/student-baseline/last.ckpt

Builds the variants with the project's own verbs (`lm quantize`, `lm prune`) into --workdir: fp32 (the
checkpoint's weights re-saved without optimizer state), int8, unstructured 30% / 50%, MLP channels
30% / 50%; adds any --students checkpoints. For each it prints: file size, parameters (non-zero ones
for unstructured pruning), bytes of the linear weights, batch-1 greedy decode tokens/s (prefill
excluded: (N - 1) / (time for N tokens - time for 1 token), variants interleaved round by round,
median of --runs rounds), and perplexity and
bits-per-byte on --test_file (non-overlapping windows of the model's context; bpb divides the summed
NLL by the UTF-8 bytes of the predicted tokens). Prints the CPU and load average: on a shared machine
the speed figures are noisy. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.checkpoint import load_model, read_checkpoint, save_model  # noqa: E402
from lm.commands.compress import prune, quantize  # noqa: E402
from lm.compress.quantize import linear_weight_bytes  # noqa: E402
from lm.model.generate import generate  # noqa: E402


def build_variants(ckpt: Path, workdir: Path, students: list[str], compressed: bool = True) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / "fp32.ckpt"
    if not fp32.exists():  # the weights alone: a fair size to compare with
        model, tokenizer = load_model(ckpt)
        save_model(fp32, model, tokenizer, dict(read_checkpoint(ckpt)["hyper_parameters"]))
    variants = {"fp32": fp32}
    for student in students:
        path = Path(student)  # named by its run folder (checkpoints/<experiment>/last.ckpt) or file name
        variants[path.parent.name if path.stem == "last" else path.stem] = path
    if not compressed:
        return variants
    variants["int8"] = workdir / "int8.ckpt"
    if not variants["int8"].exists():
        quantize(ckpt_path=str(fp32), output=str(variants["int8"]))
    for method, label in (("unstructured", "unstructured"), ("mlp_channels", "MLP channels")):
        for sparsity in (0.3, 0.5):
            path = workdir / f"{method}{int(sparsity * 100)}.ckpt"
            if not path.exists():
                prune(ckpt_path=str(fp32), output=str(path), method=method, sparsity=sparsity)
            variants[f"pruned {label} {sparsity:.0%}"] = path
    return variants


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(weights, non-zero weights), each tensor once; int8 scales are not counted as weights."""
    seen, total, nonzero = set(), 0, 0
    for name, t in model.state_dict().items():
        if name.endswith("weight_scale") or t.data_ptr() in seen or not (t.is_floating_point() or t.dtype == torch.int8):
            continue
        seen.add(t.data_ptr())
        total += t.numel()
        nonzero += int((t != 0).sum())
    return total, nonzero


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, runs: int) -> float:
    def timed(n: int) -> float:
        start = time.perf_counter()
        generate(model, prompt, max_new_tokens=n, temperature=0.0)
        return time.perf_counter() - start

    if runs == 0:
        timed(new_tokens)  # warm-up (and fbgemm's one-time weight packing)
        return 0.0
    rates = [(new_tokens - 1) / max(timed(new_tokens) - timed(1), 1e-9) for _ in range(runs)]
    return statistics.median(rates)


@torch.no_grad()
def perplexity_and_bpb(model, tokenizer, ids: torch.Tensor, context: int, batch_size: int = 16) -> tuple[float, float]:
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths())
    windows = ids[: (len(ids) - 1) // context * context + 1]
    inputs = windows[:-1].view(-1, context)
    targets = windows[1:].view(-1, context)
    nll, tokens, num_bytes = 0.0, 0, 0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        logits = model(x).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        tokens += y.numel()
        num_bytes += int(byte_lengths[y].sum())
    return math.exp(nll / tokens), nll / math.log(2) / num_bytes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def measure_quality(name: str, path: Path, args, text: str) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    model, tokenizer = load_model(path)
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference()  # as `lm generate` does (eager: no compile)
    ids = torch.tensor(tokenizer.encode(text)[: args.max_eval_tokens + 1])
    ppl, bpb = perplexity_and_bpb(model, tokenizer, ids, model.config.max_position_embeddings)
    weights, nonzero = count_parameters(model)
    row = {"name": name, "file_mb": path.stat().st_size / 1e6, "params": weights, "nonzero": nonzero,
           "linear_mb": linear_weight_bytes(model) / 1e6, "ppl": ppl, "bpb": bpb, "eval_tokens": len(ids) - 1}
    return row, model, ids[None, :16]


def measure_speed(rows: list[dict], models: list, prompts: list, args) -> None:
    """Decode tokens/s of every model, interleaved round by round (the machine's load drifts: each
    round measures all variants under about the same load); the median over rounds is kept."""
    rates: list[list[float]] = [[] for _ in models]
    for model, prompt in zip(models, prompts):
        decode_tokens_per_second(model, prompt, args.decode_tokens, 0)  # warm-up
    for _ in range(args.runs):
        for i, (model, prompt) in enumerate(zip(models, prompts)):
            rates[i].append(decode_tokens_per_second(model, prompt, args.decode_tokens, 1))
    for row, r in zip(rows, rates):
        row["tok_s"] = statistics.median(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="/work/artifacts/run/checkpoints/pretrain/last.ckpt")
    parser.add_argument("--students", nargs="*", default=[], help="more checkpoints to measure, e.g. the distilled student and its baseline")
    parser.add_argument("--test_file", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-v1/wiki.test.raw"))
    parser.add_argument("--workdir", default="/tmp/lm-compress-bench")
    parser.add_argument("--no_compressed", action="store_true", help="only fp32 and the --students")
    parser.add_argument("--decode_tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)")
    parser.add_argument("--max_eval_tokens", type=int, default=10 ** 9, help="score only the first N test tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.test_file).read_text(encoding="utf-8")
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    rows, models, prompts = [], [], []
    for name, path in build_variants(Path(args.ckpt), Path(args.workdir), args.students,
                                            not args.no_compressed).items():
        row, model, prompt = measure_quality(name, path, args, text)
        rows.append(row), models.append(model), prompts.append(prompt)
        print(f"scored {name}: ppl {row['ppl']:.2f}, bpb {row['bpb']:.4f}", flush=True)
    measure_speed(rows, models, prompts, args)
    base = rows[0]
    print(f"\nTest text: {args.test_file}, first {base['eval_tokens']} tokens; decode: batch 1, greedy, "
          f"{args.decode_tokens} tokens, median of {args.runs} interleaved rounds; load average now {os.getloadavg()[0]:.2f}\n")
    print("| variant | file MB | parameters (non-zero) | linear weights MB | decode tok/s | speed vs fp32 | test ppl | bpb |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" + (f" ({r['nonzero'] / 1e6:.2f}M)" if r["nonzero"] < 0.99 * r["params"] else "")
        print(f"| {r['name']} | {r['file_mb']:.1f} | {params} | {r['linear_mb']:.2f} | {r['tok_s']:.0f} | "
              f"{r['tok_s'] / base['tok_s']:.2f}x | {r['ppl']:.1f} | {r['bpb']:.3f} |")


if __name__ == "__main__":
    main()
