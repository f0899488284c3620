"""Training speed of the default recipe as users run it: `lm fit` of experiments/wikitext2_cpu.yaml (offline data),
its step times, and the share of the machine's matmul peak they reach.

    python benchmarks/recipe_throughput.py                          # the precision `precision: null` picks here
    python benchmarks/recipe_throughput.py --precisions 32-true bf16-mixed --steps 60
    python benchmarks/recipe_throughput.py -- --model.compile true     # more `lm fit` arguments after `--`
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/recipe_throughput.py --precisions 32-true

Each run is `python -m lm fit` with the recipe's own callbacks (EMA, the training-context schedule, the context
cache's calibration), Lightning's loop, logging and checkpointing, for `--steps` optimizer steps (no validation in
between; the sanity check before the first step is not timed; a 10-step LR warm-up instead of 50, so that 100 steps
reach the 512-token phase: the warm-up changes no step's cost). A callback added on the command line
(`StepClock`) notes each step's wall-clock time and training context. The first `--warmup` steps of each context are
left out; the table reports the median step per context (256-token windows for the first 85% of a run, then 512).

Utilization = (model FLOPs + optimizer FLOPs) per step / step time / the measured matmul peak of the precision's
dtype (a 2048^2 matmul, `lm.callbacks.measure_matmul_flops`, measured in the same process before the run):
- model FLOPs: `GPT.flops_per_token(context)` (6 x matmul parameters + the attention scores) x tokens per step;
- optimizer FLOPs: Muon's Newton-Schulz iterations over its matrices (`lm.modules.optimizers.newton_schulz_flops`);
  AdamW's elementwise work is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StepClock(L.Callback):
    """Writes each training step's (context, seconds) and the run's FLOPs per step to `path` (JSON) at the end."""

    def __init__(self, path: str):
        self.path, self.steps, self._start, self.tokens = path, [], None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((int(pl_module.training_context or batch[0].shape[1]), time.perf_counter() - self._start))
        self.tokens = batch[1].numel()

    def on_train_end(self, trainer, pl_module):
        from lm.modules.optimizers import newton_schulz_flops

        optimizer = trainer.optimizers[0]
        muon = getattr(optimizer, "muon", None)
        dtype = muon.iteration_dtype() if muon else None  # on the Gram matrix in fp32: fewer FLOPs
        optimizer_flops = sum(newton_schulz_flops(tuple(p.shape), group["ns_steps"], dtype)
                              for group in (muon.param_groups if muon else []) for p in group["params"])
        contexts = sorted({context for context, _ in self.steps})
        Path(self.path).write_text(json.dumps({
            "steps": self.steps, "tokens_per_step": self.tokens, "optimizer_flops": optimizer_flops,
            "model_flops_per_token": {c: pl_module.model.flops_per_token(c) for c in contexts},
            "precision": str(trainer.precision)}))


def run(precision: str, steps: int, workdir: Path, fit_args: list[str] = ()) -> dict:
    record, experiment = workdir / f"steps_{precision}.json", f"recipe_throughput_{precision}"
    outputs = [ROOT / folder / experiment for folder in ("checkpoints", "logs")]
    if any(path.exists() for path in outputs):
        sys.exit(f"{outputs[0]} or {outputs[1]} exists (an earlier run's?): move or delete it first.")
    command = [sys.executable, "-m", "lm", "fit", "--config", str(ROOT / "experiments" / "wikitext2_cpu.yaml"),
               "--config", str(ROOT / "experiments" / "data" / "wikitext2_offline.yaml"),
               "--experiment", experiment, "--trainer.precision", precision,
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(10 * steps),
               "--model.warmup_steps", "10",  # the schedule's progress starts after the warm-up: 512 from step ~87 of 100
               "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks+=benchmarks.recipe_throughput.StepClock",
               "--trainer.callbacks.path", str(record), *fit_args]
    print("$ " + " ".join(command), flush=True)
    fit = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    for path in outputs:  # this run's own checkpoints and logs: a measurement, not a model
        shutil.rmtree(path, ignore_errors=True)
    if fit.returncode != 0:
        sys.exit(f"lm fit failed ({fit.returncode}):\n{fit.stderr[-3000:]}")
    return json.loads(record.read_text())


def main() -> None:
    import torch

    from lm.callbacks import measure_matmul_flops
    from lm.runtime.hardware import auto_precision, describe_cpu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=None, choices=["32-true", "bf16-mixed"],
                        help="default: what the recipe's `precision: null` picks on this CPU")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps per run: the first 10 warm up the LR, then 85%% of the rest at 256 tokens")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each context not counted")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER,
                        help="after `--`: more `lm fit` arguments for every run, e.g. -- --model.compile true")
    args = parser.parse_args()
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    precisions = args.precisions or [auto_precision("cpu")[0]]
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in precisions:
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
            peak = measure_matmul_flops(dtype)
            record = run(precision, args.steps, Path(scratch), fit_args)
            for context in sorted({c for c, _ in record["steps"]}):
                times = [s for c, s in record["steps"] if c == context][args.warmup:]
                if not times:
                    continue
                step = statistics.median(times)
                model = record["model_flops_per_token"][str(context)] * record["tokens_per_step"]
                flops = model + record["optimizer_flops"]
                rows.append((precision, context, len(times), step, record["tokens_per_step"] / step,
                             flops / step / 1e9, peak / 1e9, flops / step / peak, model / step / peak))
    print(f"\n| precision | context | steps | ms/step | tokens/s | GFLOP/s (model + Muon) | peak GFLOP/s | "
          f"of peak | model FLOPs only |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, c, n, step, tok_s, gflops, peak, share, model_share in rows:
        print(f"| {p} | {c} | {n} | {step * 1e3:.0f} | {tok_s:.0f} | {gflops:.0f} | {peak:.0f} | "
              f"**{share:.0%}** | {model_share:.0%} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
