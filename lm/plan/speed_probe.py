"""Time the recipe's own training step on this machine: the MFU `lm plan --device_kind cpu` plans with.

Why: small models are overhead-bound. The default CPU recipe (4 x 256, context 512, batch 4, vocab 8192,
Muon, EMA) spends a large share of its step outside big matmuls (norms, rotary, QK-norm, the fp32
log-softmax over 8192 logits, dropout, Muon's Newton-Schulz on 256-wide matrices, Lightning's per-step
work): in bf16-mixed on a Zen 4 it reaches 47-52% of the bf16 matmul peak (72-82% of the fp32 one in
32-true), so the 80% the 6 x 384 model reached predicted it 79% too fast. Rather than model every kernel,
`lm plan` times the step.

`probe_training_step(recipe_args, precision, micro_batch, block_size, ...)` runs the recipe's training step
the way `lm fit` runs it, in this process, and returns its time (`StepProbe`):
- the recipe's LightningModule, built as `lm fit` builds it (class_path + init_args of the parsed config;
  real weights on the CPU; `init_from` left out: which weights does not change the speed);
- random token batches of the recipe's micro-batch x block size over the model's vocabulary (no data is
  read or prepared);
- Lightning's own Trainer loop, with the recipe's precision (autocast bf16 for bf16-mixed), gradient
  accumulation, gradient clipping and log interval, the optimizer and LR scheduler of the module's
  `configure_optimizers` (Muon + AdamW for the CPU recipe), a TensorBoard logger (in a temporary folder)
  and `LearningRateMonitor` as `lm fit` has, and the recipe's per-step callbacks (weight averaging such as
  the EMA, `NonFiniteGuard`, `TokenThroughputMonitor`); no validation, no checkpoints, no progress bar;
- the threads Lightning gives one of the node's processes (`cpu_threads_per_process`) and the glibc
  allocator settings `lm fit` applies (`lm.runtime.allocator.keep_large_allocations_in_heap`).
It runs `warmup` optimizer steps (first-touch allocations, autocast caches, optimizer state), then times
optimizer steps (wall time from the end of one to the end of the next: forward, backward, optimizer,
callbacks, logging, data) until `steps` are timed or `budget` seconds have passed (at least `MIN_STEPS`),
and takes their median: robust to another process's burst on a shared machine, as the figure it predicts
(`lm fit`'s median tokens/s between log points: see `lm.plan.probe.logged_tokens_per_second`) is.

A multi-process recipe (DDP, FSDP) is probed as one process with the threads each of its processes gets,
without the strategy; the plan applies that MFU per device and adds the communication.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lm.cli.lightning_cli import parse_recipe
from lm.io.class_paths import import_class
from lm.plan.devices import cpu_threads_per_process
from lm.runtime.allocator import keep_large_allocations_in_heap

MIN_STEPS = 3                # timed optimizer steps a probe needs, whatever its budget
DEFAULT_STEPS = 10           # timed optimizer steps (after the warm-up) when the budget allows
DEFAULT_WARMUP = 3           # untimed optimizer steps first
DEFAULT_BUDGET = 30.0        # seconds: a probe stops timing after this (and is skipped if it would not fit)
PER_STEP_CALLBACKS = ("ExponentialMovingAverage", "WeightAveraging", "EMAWeightAveraging",
                      "StochasticWeightAveraging", "NonFiniteGuard", "TokenThroughputMonitor")


@dataclass(frozen=True)
class StepProbe:
    """What a probe measured: optimizer-step wall times after its warm-up."""

    step_seconds: float                 # median of `step_times`
    step_times: tuple[float, ...]       # each timed optimizer step, in order
    warmup_steps: int
    threads: int
    precision: str
    callbacks: tuple[str, ...]          # the recipe's callbacks that ran in it
    seconds: float                      # the probe's whole wall time (building the model included)

    @property
    def steps(self) -> int:
        return len(self.step_times)


class StepTimer(Callback):
    """perf_counter at the end of every optimizer step; stops the run once `warmup` + `steps` steps are
    timed or, past `warmup` + MIN_STEPS, the timing `budget` (seconds) is spent."""

    def __init__(self, warmup: int, steps: int, budget: float) -> None:
        self.warmup, self.steps, self.budget = warmup, steps, budget
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not an optimizer step
        self.ends.append(time.perf_counter())
        timed = len(self.ends) - self.warmup  # steps ended after the warm-up's last one
        if timed >= self.steps or (timed >= MIN_STEPS and self.ends[-1] - self.ends[self.warmup - 1] > self.budget):
            trainer.should_stop = True

    def step_times(self) -> list[float]:
        ends = self.ends[self.warmup - 1:]  # a step's time: from the end of the one before it
        return [b - a for a, b in zip(ends, ends[1:])]


def probe_training_step(recipe_args: list[str], precision: str, micro_batch: int, block_size: int,
                        accumulation: int = 1, processes: int = 1, steps: int = DEFAULT_STEPS,
                        warmup: int = DEFAULT_WARMUP, budget: float = DEFAULT_BUDGET) -> StepProbe:
    """Time `steps` optimizer steps of `lm fit <recipe_args>`'s training step in this process (see the module
    docstring), with `precision`, `micro_batch` sequences of `block_size` tokens and `accumulation`, on the
    threads one of `processes` processes gets."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"A probe needs steps >= 1 and warmup >= 1 (the first step's start is not timed), "
                         f"got steps={steps}, warmup={warmup}.")
    started = time.perf_counter()
    config = parse_recipe(recipe_args)
    keep_large_allocations_in_heap()  # lm fit's allocator settings (process-wide, as in lm fit)
    threads = cpu_threads_per_process(processes)
    saved_threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(threads)
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="lm-plan-probe-") as folder:
            module = build_module(config.model)
            callbacks = _per_step_callbacks(config.trainer.get("callbacks"))
            timer = StepTimer(warmup, steps, budget)
            trainer = _trainer(config.trainer, folder, precision, accumulation, [*callbacks, timer],
                               max_steps=warmup + steps)
            vocab = int((getattr(module, "config", None) or module.model.config).vocab_size)
            batches = (warmup + steps) * accumulation
            trainer.fit(module, train_dataloaders=random_batches(batches, micro_batch, block_size, vocab))
    finally:
        torch.set_num_threads(saved_threads)
        torch.random.set_rng_state(rng)
    times = timer.step_times()
    if not times:
        raise RuntimeError("The speed probe timed no optimizer step.")
    return StepProbe(step_seconds=statistics.median(times), step_times=tuple(times), warmup_steps=warmup,
                     threads=threads, precision=precision, callbacks=tuple(type(c).__name__ for c in callbacks),
                     seconds=time.perf_counter() - started)


def build_module(model_config: Any):
    """The recipe's LightningModule with real weights, as `lm fit` instantiates it (`init_from` dropped)."""
    init_args = model_config.init_args.as_dict()
    if init_args.get("init_from"):
        init_args["init_from"] = None  # the speed does not depend on which weights
    return import_class(model_config.class_path)(**init_args)


def _per_step_callbacks(callbacks: Any) -> list:
    """Instances of the recipe's callbacks that work on every training step (`PER_STEP_CALLBACKS`); those
    that act at validation, at checkpoints or every N steps are left out (the figure the probe predicts is a
    median over log intervals, which leaves such rare intervals out too)."""
    chosen = []
    for callback in callbacks or []:
        if not hasattr(callback, "get"):  # an instance given in Python
            if type(callback).__name__ in PER_STEP_CALLBACKS:
                chosen.append(callback)
            continue
        class_path = str(callback.get("class_path") or "")
        if class_path.rsplit(".", 1)[-1] in PER_STEP_CALLBACKS:
            init_args = callback.get("init_args")
            chosen.append(import_class(class_path)(**(init_args.as_dict() if init_args is not None else {})))
    return chosen


def _trainer(trainer_config: Any, folder: str, precision: str, accumulation: int, callbacks: list, max_steps: int):
    return Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=max_steps, max_epochs=-1,
        accumulate_grad_batches=accumulation, gradient_clip_val=trainer_config.get("gradient_clip_val"),
        gradient_clip_algorithm=trainer_config.get("gradient_clip_algorithm"),
        log_every_n_steps=int(trainer_config.get("log_every_n_steps") or 50),
        logger=TensorBoardLogger(folder, name="probe"), callbacks=[LearningRateMonitor(logging_interval="step"), *callbacks],
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder)


def random_batches(count: int, micro_batch: int, block_size: int, vocab_size: int):
    """A DataLoader of `count` (input_ids, targets) batches of random token ids, as the recipe's windows are shaped."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (count * micro_batch, block_size + 1), generator=generator)

    class Windows(Dataset):
        def __len__(self) -> int:
            return tokens.shape[0]

        def __getitem__(self, index: int):
            return tokens[index, :-1], tokens[index, 1:]

    return DataLoader(Windows(), batch_size=micro_batch, shuffle=False, num_workers=0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's start-up lines and warnings (no GPU, few workers, ...) are not part of a plan's output."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def probe_mfu(probe: StepProbe, flops_per_step: float, peak_flops: float) -> float:
    """The MFU of the probed step: the step's FLOPs (model + optimizer, as the plan counts them) / its time / the peak."""
    return flops_per_step / (probe.step_seconds * peak_flops)


def skip_reason(estimated_step_seconds: float, fits: bool, warmup: int = DEFAULT_WARMUP,
                budget: float = DEFAULT_BUDGET) -> Optional[str]:
    """Why not to probe (None: probe): the model does not fit this machine, or `warmup` + MIN_STEPS steps at
    `estimated_step_seconds` (the table's MFU: optimistic, so this skips only what is surely too big) would
    not fit in `budget`."""
    if not fits:
        return "the recipe does not fit this machine's memory"
    needed = (warmup + MIN_STEPS) * estimated_step_seconds
    if needed > budget:
        return f"{warmup + MIN_STEPS} steps would take at least {needed:,.0f} s, over the probe's {budget:.0f} s"
    return None
