"""Training throughput of `lm` beside nanoGPT, the same model shape, each side its own process, interleaved rounds.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT       # its model.py is loaded from there
    python benchmarks/vs_nanogpt.py --nanogpt /tmp/nanoGPT                       # fp32 and, where native, bf16
    python benchmarks/vs_nanogpt.py --nanogpt /tmp/nanoGPT --precisions 32-true --rounds 5

The shape: GPT-2's architecture (learned positions, LayerNorm, GELU, tied embeddings, biases), 6 layers, 6 heads,
hidden 384, vocabulary 8,192, 16 sequences of 256 tokens per step, no dropout. Each side runs the loop its users
run, on the same random batches:
- nanoGPT: `model(idx, targets)` (its cross-entropy over the full logits), `clip_grad_norm_(1.0)`, its own
  `configure_optimizers` (AdamW, fused only on CUDA), `zero_grad(set_to_none=True)`, `loss.item()`;
- lm: `lm.model.GPT` with `LanguageModel.compute_loss`, the same clipping, `build_optimizer` (fused AdamW),
  `loss.item()`.
bf16 is CPU autocast on both sides (nanoGPT's train.py runs plain fp32 on CPU; autocast is what a bf16 user adds).
A round runs one process per side (lm first, then nanoGPT, then the other order next round), each timing
`--steps` steps after `--warmup`; the table gives the median of all timed steps and lm's speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, HIDDEN, VOCAB, BLOCK, BATCH = 6, 6, 384, 8192, 256, 16


def load_nanogpt(path: Path):
    model_file = path / "model.py"
    if not model_file.is_file():
        sys.exit(f"{model_file} not found: --nanogpt is a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT).")
    spec = importlib.util.spec_from_file_location("nanogpt_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_side(side: str, precision: str, steps: int, warmup: int, nanogpt: Path) -> list[float]:
    """Step times (s) of `side` ("lm" or "nanogpt") in this process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lm.runtime.allocator import keep_large_allocations_in_heap

    keep_large_allocations_in_heap()  # what `lm` does on import of its CLI; the same for both sides
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    if side == "nanogpt":
        nano = load_nanogpt(nanogpt)
        model = nano.GPT(nano.GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS,
                                        n_embd=HIDDEN, dropout=0.0, bias=True))
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")

        def loss_of(input_ids, targets):
            return model(input_ids, targets)[1]
    else:
        from lm.model import GPT, GPTConfig
        from lm.modules import LanguageModel
        from lm.modules.optimizers import build_optimizer

        model = GPT(GPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              max_position_embeddings=BLOCK, dropout=0.0))
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), fused=True)

        def loss_of(input_ids, targets):
            return LanguageModel.compute_loss(None, model(input_ids), targets)
    model.train()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else nullcontext
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        input_ids, targets = batches[step % len(batches)]
        with autocast():
            loss = loss_of(input_ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (its model.py is used)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["32-true", "bf16-mixed"],
                        help="default: 32-true, and bf16-mixed where the CPU has native bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["lm", "nanogpt"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_side(args.side, args.precision, args.steps, args.warmup, args.nanogpt.resolve())))
        return
    load_nanogpt(args.nanogpt)  # a clear message now rather than from a child
    sys.path.insert(0, str(ROOT))
    from lm.runtime.hardware import bf16_is_fast, describe_cpu

    precisions = args.precisions or ["32-true"] + (["bf16-mixed"] if bf16_is_fast("cpu")[0] else [])
    print(f"CPU: {describe_cpu()}; {args.threads} threads; load {os.getloadavg()[0]:.2f}", flush=True)
    tokens = BATCH * BLOCK
    print("\n| precision | nanoGPT tok/s | lm tok/s | lm / nanoGPT |\n|---|---:|---:|---:|")
    for precision in precisions:
        times = {"lm": [], "nanogpt": []}
        for round_ in range(args.rounds):
            for side in (("lm", "nanogpt") if round_ % 2 == 0 else ("nanogpt", "lm")):
                child = subprocess.run([sys.executable, __file__, "--nanogpt", str(args.nanogpt), "--side", side,
                                        "--precision", precision, "--steps", str(args.steps), "--warmup",
                                        str(args.warmup), "--threads", str(args.threads)],
                                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if child.returncode != 0:
                    sys.exit(f"{side} failed:\n{child.stderr[-3000:]}")
                times[side] += json.loads(child.stdout.strip().splitlines()[-1])
        speed = {side: tokens / statistics.median(t) for side, t in times.items()}
        print(f"| {precision} | {speed['nanogpt']:.0f} | {speed['lm']:.0f} | **{speed['lm'] / speed['nanogpt']:.2f}x** |",
              flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
