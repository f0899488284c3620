"""Training throughput of `lm`: a plain PyTorch loop vs `lm`'s Lightning Trainer, same model and batches.

    python benchmarks/train_throughput.py                                 # all settings, ~6-8 min on 2 cores
    python benchmarks/train_throughput.py --precisions bf16-mixed --compile on --steps 20
    python benchmarks/train_throughput.py --profile plain --precisions 32-true --compile off   # where time goes

For every precision (32-true, bf16-mixed = CPU autocast) x compile (off/on) it times:
- `plain`: a hand-written loop with no Lightning: the same `GPT`, the loss of `LanguageModel.compute_loss`
  (float32 log-softmax), the AdamW groups and warm-up + cosine schedule of lm/modules/optimizers.py, gradient
  clipping at 1.0, the same batches;
- `lightning`: `LanguageModel` in a `Trainer` with `lm`'s defaults (TensorBoard logger, LearningRateMonitor,
  ModelCheckpoint of last.ckpt, progress bar, `log_every_n_steps` 10, gradient clipping at 1.0).

The first `--warmup` steps (compilation, allocator, thread pool) are not timed. Each step is timed from
one batch start to the next; the table reports the median (robust to other processes' bursts on a
shared machine) and the mean. MFU is model FLOPs/s (`GPT.flops_per_token`: 6N + attention) over a
matmul peak measured at start in the same run (2048^2 matmul, fp32 and bf16). Lightning's overhead is
its median step time over the plain loop's, minus 1; as that ratio is within the machine's drift, the
fixed cost Lightning adds per step is also measured on a tiny model and set against each row's step
time (`print_fixed_overhead`). The machine load (`os.getloadavg`) is printed before and after: with
other processes on the cores the figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import add_model_arguments, model_config  # noqa: E402
from lm.runtime.allocator import keep_large_allocations_in_heap  # noqa: E402
from lm.callbacks import measure_matmul_flops  # noqa: E402
from lm.runtime.hardware import auto_precision, describe_cpu  # noqa: E402
from lm.model import GPT, GPTConfig  # noqa: E402
from lm.modules.optimizers import build_optimizer, warmup_cosine  # noqa: E402

PEAK_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
LR, MIN_LR_RATIO, WEIGHT_DECAY, BETAS, WARMUP_LR_STEPS, CLIP = 1e-3, 0.1, 0.1, (0.9, 0.95), 100, 1.0


def make_batches(args, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` fixed random (input_ids, targets) batches, cycled by both loops."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.block_size + 1), generator=g)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return batches


def gpt_config(args) -> GPTConfig:
    return model_config(args, context=args.block_size)


def summarize(step_times: list[float], tokens_per_step: int) -> dict[str, float]:
    median, mean = statistics.median(step_times), statistics.fmean(step_times)
    return {"ms": median * 1e3, "mean_ms": mean * 1e3, "tok_s": tokens_per_step / median,
            "mean_tok_s": tokens_per_step / mean}


# ------------------------------------------------------------------------------------ plain loop
def run_plain(args, precision: str, compile_model: bool, batches, fused: bool, profile: bool = False):
    from lm.modules import LanguageModel

    torch.manual_seed(0)
    model = GPT(gpt_config(args))
    model.train()
    net = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY, BETAS, fused=fused)
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, WARMUP_LR_STEPS, total, MIN_LR_RATIO))
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()

    compute_loss = LanguageModel.compute_loss  # the loss the LightningModule uses (float32 log-softmax)
    times, start = [], None
    profiler = _profiler(args) if profile else None
    for step in range(total + 1):
        now = time.perf_counter()
        if start is not None and step > args.warmup:
            times.append(now - start)
        start = now
        if step == total:
            break
        if profiler is not None and step == args.warmup:
            profiler.__enter__()
        input_ids, targets = batches[step % len(batches)]
        with autocast():
            logits = net(input_ids)
            loss = compute_loss(None, logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _ = loss.item()  # what a loop that prints its loss does; also Lightning's progress bar
    if profiler is not None:
        profiler.__exit__(None, None, None)
        _print_profile(profiler, f"plain {precision} compile={compile_model}")
    return times


# ------------------------------------------------------------------------------------- Lightning
def run_lightning(args, precision: str, compile_model: bool, batches, fused: bool, profile: bool = False):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lm.modules import LanguageModel

    total = args.warmup + args.steps

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.start, self.profiler = [], None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._tick(batch_idx)
            if profile and batch_idx == args.warmup:
                self.profiler = _profiler(args)
                self.profiler.__enter__()

        def _tick(self, batch_idx):
            now = time.perf_counter()
            if self.start is not None and batch_idx > args.warmup:
                self.times.append(now - self.start)
            self.start = now

        def on_train_end(self, trainer, pl_module):  # the last step ends here (no next batch start)
            self._tick(total)
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                _print_profile(self.profiler, f"lightning {precision} compile={compile_model}")

    torch.manual_seed(0)
    module = LanguageModel(gpt_config(args), learning_rate=LR, min_learning_rate=LR * MIN_LR_RATIO,
                           weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=WARMUP_LR_STEPS,
                           fused_adamw=fused, compile=compile_model)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=precision, max_steps=total, gradient_clip_val=CLIP,
            logger=TensorBoardLogger(tmp, name="bench"), log_every_n_steps=10, num_sanity_val_steps=0,
            callbacks=[LearningRateMonitor(logging_interval="step"),
                       ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=0), timer],
            enable_progress_bar=not args.no_progress_bar, enable_model_summary=False, limit_val_batches=0,
        )
        loader = DataLoader([batches[i % len(batches)] for i in range(total)], batch_size=None, shuffle=False)
        trainer.fit(module, train_dataloaders=loader)
    return timer.times


# ---------------------------------------------------------------------------- fixed overhead probe
def print_fixed_overhead(args, rows, fused: bool) -> None:
    """Lightning's fixed cost per step, measured where it is not lost in the noise.

    On the reference model a step takes seconds and this VM's speed drifts by several percent between
    runs, so the overhead column above is mostly that drift. Lightning's own work per step (hooks,
    logging, the optimizer closure, checkpoint bookkeeping) does not depend on the model size: timed
    on a tiny model (~3 ms steps, 100 of them, best of 3 interleaved pairs) it is a difference of
    milliseconds, which is then compared to the reference step time of each row above.
    """
    tiny = argparse.Namespace(**{**vars(args), "layers": 1, "heads": 1, "hidden": 64, "vocab": 256,
                                 "block_size": 32, "batch_size": 4, "steps": 100, "warmup": 5,
                                 "profile": None})
    batches = make_batches(tiny)
    best = {}
    for _ in range(3):
        for loop, run in (("plain", run_plain), ("lightning", run_lightning)):
            ms = statistics.median(run(tiny, "32-true", False, batches, fused)) * 1e3
            best[loop] = min(best.get(loop, ms), ms)
    fixed = best["lightning"] - best["plain"]
    print(f"\nLightning's fixed cost per step (tiny model, 32-true, median of 100 steps, best of 3): "
          f"plain {best['plain']:.2f} ms, lightning {best['lightning']:.2f} ms: {fixed:+.2f} ms per step")
    for precision, compile_flag, results in rows:
        if "plain" in results:
            print(f"  = {fixed / results['plain']['ms'] * 100:+.2f}% of the {results['plain']['ms']:.0f} ms "
                  f"plain step of {precision}, compile {compile_flag}")


# -------------------------------------------------------------------------------------- profiler
def _profiler(args):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False)


def _print_profile(profiler, title: str) -> None:
    print(f"\n### profile: {title}\n", file=sys.stderr)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile: the first is slow)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"],
                        choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--loops", nargs="+", default=["plain", "lightning"], choices=["plain", "lightning"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each plain/lightning pair this many times, interleaved; report the fastest run "
                             "(the one least disturbed by other processes)")
    parser.add_argument("--fused", choices=["on", "off"], default="on", help="fused AdamW (both loops)")
    parser.add_argument("--no-progress-bar", action="store_true", help="Lightning without its progress bar")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's mmap threshold alone (by default, as `lm fit` does, large "
                             "allocations stay in the heap: lm/runtime/allocator.py)")
    parser.add_argument("--no-overhead-probe", action="store_true",
                        help="skip the tiny-model measurement of Lightning's fixed per-step cost")
    parser.add_argument("--profile", choices=["plain", "lightning"], default=None,
                        help="torch.profiler table of the timed steps of this loop (stderr)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    malloc_no_mmap = not args.default_malloc and keep_large_allocations_in_heap()
    config = gpt_config(args)
    model = GPT(config)
    flops_per_token = model.flops_per_token(args.block_size)
    tokens_per_step = args.batch_size * args.block_size
    load_before = os.getloadavg()
    # Only the precisions asked for: on a CPU without native bf16 (AVX2) a bf16 2048^2 matmul takes long.
    peaks = {p: measure_matmul_flops(PEAK_DTYPES[p], seconds=2) for p in args.precisions}
    batches = make_batches(args)
    fused = args.fused == "on"

    print(f"model: {args.layers} layers, {args.heads} heads, hidden {args.hidden}, vocab {args.vocab}, block "
          f"{args.block_size}, batch {args.batch_size} ({tokens_per_step} tokens/step), "
          f"{model.num_parameters() / 1e6:.1f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token (train)")
    print(f"CPU: {describe_cpu()}; default precision here: {auto_precision('cpu')[0]}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fused AdamW {args.fused}; "
          f"malloc no-mmap {'on' if malloc_no_mmap else 'off'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per run; random tokens")
    print("matmul peak (2048^2, measured before the runs): "
          + ", ".join(f"{p} {peak / 1e9:.0f} GFLOP/s" for p, peak in peaks.items()))
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}\n", flush=True)

    rows = []
    for precision in args.precisions:
        for compile_flag in args.compile:
            compiled = compile_flag == "on"
            results = {}
            for repeat in range(args.repeats):
                for loop in args.loops:
                    run = run_plain if loop == "plain" else run_lightning
                    times = run(args, precision, compiled, batches, fused, profile=args.profile == loop and not repeat)
                    result = summarize(times, tokens_per_step)
                    if loop not in results or result["ms"] < results[loop]["ms"]:
                        results[loop] = result
                    print(f"  done: {loop} {precision} compile={compile_flag}: {result['tok_s']:.0f} tok/s "
                          f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            rows.append((precision, compile_flag, results))

    peaks_after = {p: measure_matmul_flops(PEAK_DTYPES[p]) for p in args.precisions}
    peaks = {k: max(peaks[k], peaks_after[k]) for k in peaks}
    print("| precision | compile | loop | tokens/s (median) | ms/step (median) | ms/step (mean) | MFU | "
          "Lightning overhead |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for precision, compile_flag, results in rows:
        for loop, r in results.items():
            mfu = r["tok_s"] * flops_per_token / peaks[precision]
            overhead = ""
            if loop == "lightning" and "plain" in results:
                overhead = f"{(r['ms'] / results['plain']['ms'] - 1) * 100:+.1f}%"
            print(f"| {precision} | {compile_flag} | {loop} | {r['tok_s']:.0f} | {r['ms']:.0f} | {r['mean_ms']:.0f} | "
                  f"{mfu:.1%} | {overhead} |")
    if {"plain", "lightning"} <= set(args.loops) and not args.no_overhead_probe:
        print_fixed_overhead(args, rows, fused)
    load_after = os.getloadavg()
    print("\nmatmul peak re-measured after the runs: "
          + ", ".join(f"{p} {peak / 1e9:.0f}" for p, peak in peaks_after.items())
          + " GFLOP/s (MFU uses the larger of before/after)")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
    main()
