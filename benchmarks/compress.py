"""What quantization, pruning and distillation cost and buy, measured on one trained checkpoint.

    python benchmarks/compress.py --ckpt checkpoints/wikitext2_cpu/last.ckpt \
        --distilled checkpoints/distill/last.ckpt --no_teacher checkpoints/student/last.ckpt [--compile]

Builds the variants with the project's own verbs (`lm quantize`, `lm prune`) into --workdir: fp32 (the
checkpoint's weights re-saved without optimizer state), int8, unstructured 30% / 50%, structured (MLP
channels) 30% / 50%; adds the --distilled student and the same student trained without a teacher
(--no_teacher). For each it prints: file size, parameters (non-zero ones for unstructured pruning),
bytes of the linear weights, batch-1 greedy decode tokens/s with the KV cache (prefill excluded:
(N - 1) / (time for N tokens - time for 1 token), same prompt and tokens for every variant, variants
interleaved round by round, median of --runs rounds), and perplexity and bits-per-byte on
--test_file (non-overlapping windows of the model's context; bpb divides the summed NLL by the UTF-8
bytes of the predicted tokens). Decoding is eager, as `lm generate` runs it without --compile
(`prepare_for_inference()`); --compile adds fp32 and int8 rows whose decode step is compiled (as
`lm generate --compile`; their quality columns are those of the eager rows above them). Prints the
CPU and load average: on a shared machine the speed figures are noisy. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.io.checkpoints import load_model, read_checkpoint, save_model  # noqa: E402
from lm.commands.compress import prune, quantize  # noqa: E402
from lm.compress.quantize import linear_weight_bytes  # noqa: E402
from lm.io.files import atomic_write_text  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402
from lm.model.generation import generate  # noqa: E402


def build_variants(ckpt: Path, workdir: Path, students: dict[str, Optional[str]], compressed: bool = True) -> dict[str, Path]:
    """{row name: checkpoint}: fp32, then (with `compressed`) int8 and the pruned ones, then the students given."""
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / "fp32.ckpt"
    if not fp32.exists():  # the weights alone: a fair size to compare with
        model, tokenizer = load_model(ckpt)
        save_model(fp32, model, tokenizer, dict(read_checkpoint(ckpt)["hyper_parameters"]))
    variants = {"fp32": fp32}
    if compressed:
        variants["int8"] = workdir / "int8.ckpt"
        if not variants["int8"].exists():
            quantize(ckpt_path=str(fp32), output=str(variants["int8"]))
        for method, label in (("unstructured", "unstructured"), ("mlp_channels", "structured (MLP channels)")):
            for sparsity in (0.3, 0.5):
                path = workdir / f"{method}{int(sparsity * 100)}.ckpt"
                if not path.exists():
                    prune(ckpt_path=str(fp32), output=str(path), method=method, sparsity=sparsity)
                variants[f"pruned {label} {sparsity:.0%}"] = path
    variants.update({name: Path(path) for name, path in students.items() if path})
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

    if runs == 0:  # warm-up: the int8 weight packing, and compiling both shapes the timing runs use
        timed(new_tokens), timed(1), timed(new_tokens)
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


def load_for_decoding(path: Path, compile: bool = False):
    """A checkpoint's model and tokenizer, prepared as `lm generate` prepares it (eager unless `compile`)."""
    model, tokenizer = load_model(path)
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference(compile=compile)
    return model, tokenizer


def measure_quality(name: str, path: Path, args, text: str) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    model, tokenizer = load_for_decoding(path)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the trained fp32 checkpoint (`lm fit`'s last.ckpt)")
    parser.add_argument("--distilled", help="the student trained by experiments/distill.yaml from --ckpt")
    parser.add_argument("--no_teacher", help="the same student trained without a teacher for the same steps")
    parser.add_argument("--test_file", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-v1/wiki.test.raw"))
    parser.add_argument("--workdir", default="/tmp/lm-compress-bench")
    parser.add_argument("--no_compressed", action="store_true", help="only fp32 and the students")
    parser.add_argument("--compile", action="store_true", help="add fp32 and int8 rows with a compiled decode step")
    parser.add_argument("--decode_tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores; 1 is steadier on a busy machine)")
    parser.add_argument("--max_eval_tokens", type=int, default=10 ** 9, help="score only the first N test tokens")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser.parse_args()


def add_compiled_rows(rows: list[dict], models: list, prompts: list, variants: dict[str, Path]) -> None:
    """fp32 and int8 again, decoded by the compiled step (`lm generate --compile`); quality columns are
    left empty (eager perplexity is the row above; the compiled int8 step multiplies fp32 activations
    by the int8 weights, a slightly different rounding from the eager dynamic-int8 kernel)."""
    for name in ("fp32", "int8"):
        if name in variants:
            model, _ = load_for_decoding(variants[name], compile=True)
            base = next(r for r in rows if r["name"] == name)
            rows.append({**base, "name": f"{name}, compiled decode", "ppl": None, "bpb": None})
            models.append(model), prompts.append(prompts[rows.index(base)])


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print("| variant | file MB | parameters (non-zero) | linear weights MB | decode tok/s | speed vs fp32 | test ppl | bpb |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" + (f" ({r['nonzero'] / 1e6:.2f}M)" if r["nonzero"] < 0.99 * r["params"] else "")
        quality = "| - | - |" if r["ppl"] is None else f"| {r['ppl']:.1f} | {r['bpb']:.3f} |"
        print(f"| {r['name']} | {r['file_mb']:.2f} | {params} | {r['linear_mb']:.2f} | {r['tok_s']:.0f} | "
              f"{r['tok_s'] / base['tok_s']:.2f}x {quality}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.test_file).read_text(encoding="utf-8")
    print(f"CPU: {describe_cpu()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}", flush=True)
    variants = build_variants(Path(args.ckpt), Path(args.workdir),
                              {"distilled student": args.distilled, "student without teacher": args.no_teacher},
                              not args.no_compressed)
    rows, models, prompts = [], [], []
    for name, path in variants.items():
        row, model, prompt = measure_quality(name, path, args, text)
        rows.append(row), models.append(model), prompts.append(prompt)
        print(f"scored {name}: ppl {row['ppl']:.2f}, bpb {row['bpb']:.4f}", flush=True)
    if args.compile:
        add_compiled_rows(rows, models, prompts, variants)
    measure_speed(rows, models, prompts, args)
    print(f"\nTest text: {args.test_file}, first {rows[0]['eval_tokens']} tokens; decode: batch 1, greedy, KV cache, "
          f"{args.decode_tokens} tokens, median of {args.runs} interleaved rounds; load average now "
          f"{os.getloadavg()[0]:.2f}\n")
    print_table(rows)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"cpu": describe_cpu(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
