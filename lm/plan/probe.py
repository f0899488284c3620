"""Measure a real `lm fit` run, to check a plan against it (tests/test_plan.py, benchmarks/plan_check.py).

- `MemoryProbe`: a callback that records, on every rank, the resident memory (VmRSS) after each optimizer
  step, the peak (VmHWM) and the time between consecutive steps, and writes them to
  `<output>.rank<R>.json` when training ends.
- `measure_fit(args, workdir)`: runs `lm fit <args>` in a fresh process with the probe and returns what
  every rank recorded; `prepare_data(args)` tokenizes beforehand, so no measured run does it.
- `measure_step_memory(args, precision)`: the peak memory one training step of the recipe's module adds
  (forward, backward, optimizer), in a fresh process: what `lm plan`'s per-step items (activations,
  temporary logits, gradients, bf16 weight copies) are checked against, and how the memory levers
  (`--model.activation_checkpointing`, `--model.loss_chunk_size`) are measured (benchmarks/memory_levers.py).
- `logged_tokens_per_second(log_dir)`: the tokens/s a run reports, from its TensorBoard log: the median over
  the intervals between `train/loss` log points, validation excluded (what `lm plan`'s speed is checked
  against; the plan's own speed probe is lm/plan/speed_probe.py).

Why resident memory after a step isolates the model/optimizer part: at that point the activations,
logits and gathered FSDP units of the step are freed, and what is alive is the weights, gradients,
optimizer state (and DDP's gradient buckets), plus the run's fixed costs (Python, torch, Lightning,
data). `measure_fit` sets glibc's mmap threshold to 64 KiB (`MALLOC_MMAP_THRESHOLD_`, which also stops
glibc from raising it as it goes) and turns off lm's keep-in-heap allocator setting, so every large
tensor is its own mapping and freeing it gives the memory back at once: RSS follows the live tensors.
It also sets MKL_DISABLE_FAST_MM, so MKL does not keep its matmul scratch buffers (sized by the
model's matrices: without it, repeated runs of one recipe differed by ~30 MiB; with it by < 1 MiB).
The fixed costs cancel in the difference of two runs that differ only in model size, which is what
the plan check compares with the planned difference.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, LightningModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.cli.lightning_cli import parse_recipe
from lm.data import TextDataModule
from lm.errors import LMError
from lm.io.files import atomic_write_text
from lm.plan.speed_probe import build_module, random_batches

MEASURE_ENV = {"LM_DEFAULT_MALLOC": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}


def process_memory() -> dict[str, int]:
    """Resident (VmRSS) and peak resident (VmHWM) bytes of this process, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


class MemoryProbe(Callback):
    """Records resident memory after every optimizer step, the peak, and step times, per rank.

    Args:
        output: Path prefix of the JSON files (`<output>.rank<R>.json`).
    """

    def __init__(self, output: str = "memory_probe") -> None:
        self.output = output
        self.rss_after_step: list[int] = []
        self.step_ends: list[float] = []
        self.tokens_per_step = 0
        self.rss_at_train_start = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rss_at_train_start = process_memory()["VmRSS"]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not an optimizer step
        self.step_ends.append(time.perf_counter())
        self.rss_after_step.append(process_memory()["VmRSS"])
        self.tokens_per_step = batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "tokens_per_step": self.tokens_per_step,
                  "precision": str(trainer.precision),  # what the run computed in, to set against the plan's
                  "rss_after_step": self.rss_after_step,
                  "rss_at_train_start": self.rss_at_train_start, "peak_rss": process_memory()["VmHWM"],
                  "step_seconds": [b - a for a, b in zip(self.step_ends, self.step_ends[1:])]}
        atomic_write_text(f"{self.output}.rank{trainer.global_rank}.json", json.dumps(result))


def prepare_data(args: list[str]) -> None:
    """Train the tokenizer and write the token cache of `lm fit <args>` here, before any measured run:
    the run that tokenizes keeps ~30 MiB more resident memory afterwards (seen in plan_check.py)."""
    TextDataModule(**parse_recipe(args).data.as_dict()).prepare_data()


def measure_fit(args: list[str], workdir: Path, timeout: float = 900, env: Optional[dict[str, str]] = None,
                memory: bool = True) -> list[dict[str, Any]]:
    """Run `lm fit <args>` in `workdir` with a `MemoryProbe` (and, with `memory`, the memory settings above);
    return the ranks' records, with `tokens_per_second` (steps after the first two: warm-up) and `model_rss`
    (the median resident memory after those steps) added.

    Time speed with `memory=False`: the memory settings make every large allocation a fresh mapping whose
    pages fault in on first touch, which slows a run, and some strategies far more than others (FSDP2's
    gather and copy buffers: 13.5 s against 9.4 s per step of the 6 x 384 CPU recipe on 2 Zen 3 cores), so
    tokens/s measured under them is not what a user's run gets."""
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / "probe.yaml"
    atomic_write_text(overlay, json.dumps({"trainer": {"callbacks+": [
        {"class_path": "lm.plan.probe.MemoryProbe", "init_args": {"output": str(workdir / "probe")}}]}}))
    env = {**os.environ, **(MEASURE_ENV if memory else {}), **(env or {})}  # env: e.g. OMP_NUM_THREADS=1
    command = [sys.executable, "-m", "lm", "fit", *args, "--config", str(overlay)]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"lm fit failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in sorted(workdir.glob("probe.rank*.json"))]
    for record in records:
        steady = record["step_seconds"][2:] or record["step_seconds"]
        record["tokens_per_second"] = record["tokens_per_step"] / statistics.median(steady)
        record["model_rss"] = statistics.median(record["rss_after_step"][2:] or record["rss_after_step"])
    return records


def measure_step_memory(args: list[str], precision: str = "32-true", micro_batch: Optional[int] = None,
                        timeout: float = 900) -> dict[str, int]:
    """The memory one training step of `lm fit <args>`'s module takes, measured in a fresh process (the
    memory settings above, so freed tensors leave RSS at once).

    The process builds the recipe's LightningModule (real weights), its optimizer as `configure_optimizers`
    builds it, and a random batch of the recipe's micro-batch (or `micro_batch`) x context; it runs one step
    (forward and loss as `LanguageModel.training_loss`, backward, optimizer step, gradients set to None as
    Lightning does), so the optimizer state and every first-touch allocation exist, then resets the peak
    (`/proc/self/clear_refs`) and runs a second. Returns `step_peak`: the peak resident memory of the second
    step above the resident memory before it (activations, logits, gradients and every temporary of the
    step; the weights and optimizer state were there before), and `rss_before`. `precision`: 32-true or
    bf16-mixed (CPU autocast)."""
    if precision not in ("32-true", "bf16-mixed"):
        raise LMError(f"measure_step_memory runs 32-true or bf16-mixed, not {precision!r}.")
    request = json.dumps({"args": args, "precision": precision, "micro_batch": micro_batch})
    command = [sys.executable, "-c", "import sys; from lm.plan.probe import step_memory_main; step_memory_main(sys.argv[1])",
               request]
    result = subprocess.run(command, env={**os.environ, **MEASURE_ENV}, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the step-memory process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_memory_main(request: str) -> None:
    """The fresh process of `measure_step_memory`: prints its JSON result as the last line."""
    options = json.loads(request)
    config = parse_recipe(options["args"])
    module = build_module(config.model).train()
    optimizer = module.new_optimizer()
    vocab = int(module.model.config.vocab_size)
    micro_batch = options["micro_batch"] or int(config.data.batch_size)
    batch = next(iter(random_batches(1, micro_batch, int(config.data.block_size), vocab)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=options["precision"] == "bf16-mixed")

    def step() -> None:
        with autocast:
            loss = module.training_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state, first-touch allocations
    gc.collect()
    before = process_memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is the second step's
    step()
    print(json.dumps({"step_peak": process_memory()["VmHWM"] - before, "rss_before": before}))


def logged_tokens_per_second(log_dir: Path) -> dict[str, Any]:
    """The tokens/s `lm fit` reports, from a run's TensorBoard folder (logs/<experiment>/version_N): `train/loss`
    is logged every `trainer.log_every_n_steps` steps; each interval between two consecutive log points
    runs (step difference) x `train/tokens_per_step` tokens in the wall time between the two events; the
    figure is the median over the intervals in which no validation ran (no `val/loss` event inside). The
    first steps (before the first log point: start-up, warm-up) are in no interval; a checkpoint written at
    a validation falls in an excluded interval; the median leaves out an interval slowed by anything rare
    (a text sample every N steps, another process's burst). Returns `tokens_per_second` and the
    `intervals` (tokens/s of each, in order)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "train/loss" not in tags or "train/tokens_per_step" not in tags:
        raise RuntimeError(f"{log_dir} has no train/loss and train/tokens_per_step scalars: not an lm fit run's log.")
    points = events.Scalars("train/loss")
    tokens_per_step = {e.step: e.value for e in events.Scalars("train/tokens_per_step")}
    validations = [e.wall_time for e in events.Scalars("val/loss")] if "val/loss" in tags else []
    intervals = []
    for a, b in zip(points, points[1:]):
        if b.step <= a.step or any(a.wall_time < v <= b.wall_time for v in validations):
            continue
        tokens = (b.step - a.step) * tokens_per_step.get(b.step, tokens_per_step.get(a.step, 0.0))
        intervals.append(tokens / max(b.wall_time - a.wall_time, 1e-9))
    if not intervals:
        raise RuntimeError(f"{log_dir}: fewer than two train/loss log points outside validation: train longer.")
    return {"tokens_per_second": statistics.median(intervals), "intervals": intervals}


def measure_gloo(world_size: int = 2, sizes: tuple[int, ...] = (1, 1 << 20, 4 << 20)) -> dict[str, float]:
    """gloo's cost on this machine: `world_size` local processes (one thread each) time all-gathers and
    reduce-scatters of `sizes` fp32 values per rank (median of 5 rounds). Returns
    - `bandwidth`: bytes/s each rank moves ((N-1)/N of the full tensor), the slope between the two largest
      sizes, so the fixed cost's noise cancels;
    - `idle_latency`: the time of the smallest size, issued back to back by ranks doing nothing else;
    - `collective_latency`: the time of the smallest size issued the way a training step issues it, right
      after a chunk of compute on every rank (`_after_compute`): the ranks finish their compute at slightly
      different times and gloo's threads must be woken on cores busy with compute. On 2 Zen 3 cores it
      was 0.8-4.0 ms against 0.3-1.4 ms idle (mostly more, not always): the fixed cost per collective
      that devices.yaml's cpu entry records and the plan charges.
    `python -c "from lm.plan.probe import measure_gloo; print(measure_gloo())"`."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = 29400 + os.getpid() % 1000
    workers = [context.Process(target=_gloo_worker, args=(rank, world_size, port, sizes, queue)) for rank in range(world_size)]
    for worker in workers:
        worker.start()
    times = queue.get()
    for worker in workers:
        worker.join()

    def mean_time(numel: int) -> float:
        return statistics.fmean(times[(name, numel)] for name in ("all_gather", "reduce_scatter"))

    small, large = sizes[-2], sizes[-1]
    moved = (large - small) * 4 * (world_size - 1)  # extra bytes each rank sends: (N-1)/N of the extra full tensor
    return {"collective_latency": times["after_compute"], "idle_latency": mean_time(sizes[0]),
            "bandwidth": moved / max(mean_time(large) - mean_time(small), 1e-9)}


def _gloo_worker(rank: int, world_size: int, port: int, sizes: tuple[int, ...], queue, repeats: int = 10,
                 rounds_of: int = 5) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    times = {}
    for numel in sizes:
        full, shard = torch.randn(numel * world_size), torch.randn(numel)
        for name, collective in (("all_gather", lambda: dist.all_gather_single(full, shard)),
                                 ("reduce_scatter", lambda: dist.reduce_scatter_single(shard, full))):
            collective()  # warm-up: connections, buffers
            rounds = []
            for _ in range(rounds_of):  # the median round: robust to other processes' bursts
                dist.barrier()
                start = time.perf_counter()
                for _ in range(repeats):
                    collective()
                rounds.append((time.perf_counter() - start) / repeats)
            times[(name, numel)] = statistics.median(rounds)
    full, shard = torch.randn(world_size), torch.randn(1)
    matmuls = torch.tensor([_matmuls_for(0.02)])
    dist.all_reduce(matmuls, op=dist.ReduceOp.MAX)  # the same work on every rank, as in a training step
    times["after_compute"] = _after_compute(lambda: dist.all_gather_single(full, shard), dist.barrier, int(matmuls))
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def _matmuls_for(seconds: float) -> int:
    """How many 256 x 256 matmuls take `seconds` on this process's thread."""
    a = torch.randn(256, 256)
    a @ a
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    return max(1, round(seconds / max((time.perf_counter() - start) / 10, 1e-6)))


def _after_compute(collective, barrier, matmuls: int, rounds: int = 30) -> float:
    """Median time of `collective` issued right after `matmuls` 256 x 256 matmuls on every rank, as FSDP's
    and DDP's collectives come between chunks of a training step's compute (each round starts together)."""
    a = torch.randn(256, 256)
    collective()
    times = []
    for _ in range(rounds):
        barrier()
        for _ in range(matmuls):
            a @ a
        start = time.perf_counter()
        collective()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
