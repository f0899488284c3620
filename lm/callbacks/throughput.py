"""Throughput for language models: tokens/s, FLOP/s and MFU (`TokenThroughputMonitor`).

- `TokenThroughputMonitor`: Lightning's `ThroughputMonitor` set up for `(input_ids, targets)` batches.
- `batch_size`, `num_tokens`: the functions `ThroughputMonitor` needs, importable by path from YAML.
- `measure_matmul_flops`: a quick matmul peak of this machine (FLOP/s), the denominator of MFU on CPU,
  where Lightning has no table of peaks.
- `model_flops_per_token`: training FLOPs per token of a module's network (`GPT.flops_per_token`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from lm.errors import LMError


def batch_size(batch: Any) -> int:
    """Sequences in an `(input_ids, targets)` batch (or a bare `input_ids` tensor)."""
    input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(input_ids.shape[0])


def num_tokens(batch: Any) -> int:
    """Tokens fed to the model in an `(input_ids, targets)` batch: batch x sequence length."""
    input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(input_ids.numel())



def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0,
                         device: Union[str, torch.device] = "cpu") -> float:
    """Best FLOP/s of a square `size` matmul in `dtype` on `device`, with torch's current thread count.

    A practical peak of this machine (what its BLAS reaches on a large matmul), for MFU where no
    datasheet number exists (CPUs). Takes about `seconds` plus a warm-up. Where `dtype` has no fast kernel
    (bf16 on a CPU without AVX-512-BF16/AMX: under 1 GFLOP/s) one 2048^2 product would take a minute, so a
    256^2 product is timed first and `size` halved (not below 256) until one product would take at most
    `seconds`: the rate of a product that size is what such a CPU reaches on the recipe's small matrices."""
    size = _affordable_size(dtype, size, seconds, device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size ** 3
    for _ in range(2):  # warm-up: thread pool, BLAS kernel selection
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start > seconds:  # slower than the 256^2 probe foretold: stop here
            return flops / (time.perf_counter() - start)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = max(best, flops / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


def _affordable_size(dtype: torch.dtype, size: int, seconds: float, device: Union[str, torch.device]) -> int:
    """The largest of size, size/2, ... whose product the rate of a 256^2 one says takes at most `seconds`
    (the small product is the slower per FLOP where kernels are fast, so a fast dtype keeps `size`)."""
    a = torch.randn(256, 256, device=device).to(dtype)
    elapsed = float("inf")
    for _ in range(2):  # the second: after the thread pool's and the kernel's first-call costs
        _synchronize(device)
        start = time.perf_counter()
        a @ a
        _synchronize(device)
        elapsed = time.perf_counter() - start
    while size > 256 and elapsed * (size / 256) ** 3 > seconds:
        size //= 2
    return size


def _synchronize(device: Union[str, torch.device]) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def model_flops_per_token(pl_module: LightningModule, sequence_length: int) -> float:
    """Training FLOPs per token (forward + backward) of the module's network: `GPT.flops_per_token`
    when it has one, else 6 x parameters (the matmul estimate)."""
    net = getattr(pl_module, "model", pl_module)
    if hasattr(net, "flops_per_token"):
        return float(net.flops_per_token(sequence_length))
    return 6.0 * sum(p.numel() for p in net.parameters())


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` for language models: tokens/s and MFU, no code needed.

    Logged (every `trainer.log_every_n_steps`, once `window_size` batches were seen), with the stage as
    prefix (`train/`, `validate/`):
    - `device/items_per_sec`: tokens per second (one "item" is one token of `input_ids`);
    - `device/samples_per_sec`, `device/batches_per_sec`;
    - `device/flops_per_sec`: model FLOP/s (training: forward + backward, `GPT.flops_per_token`;
      validation: forward only, a third of it);
    - `device/mfu`: FLOP/s / peak, when a peak is known: `peak_flops` (FLOP/s of one device), or
      `peak_flops: measure` to time a large matmul in the training precision at start-up (CPU), or
      Lightning's table of GPU peaks when `peak_flops` is None.

    Args:
        peak_flops: Peak FLOP/s of one device, "measure", or None (Lightning's GPU table; no MFU on CPU).
        window_size: Batches in the moving window the rates are averaged over.
        batch_size_fn: Sequences in a batch (default: `input_ids.shape[0]`).
        length_fn: Tokens in a batch (default: `input_ids.numel()`).
        separator: Between the metric name parts.
    """

    def __init__(self, peak_flops: Union[float, Literal["measure"], None] = None, window_size: int = 10,
                 batch_size_fn: Callable[[Any], int] = batch_size,
                 length_fn: Optional[Callable[[Any], int]] = num_tokens, separator: str = "/") -> None:
        if window_size < 2:
            raise LMError(f"window_size must be >= 2 (a rate needs two time points), got {window_size}.")
        super().__init__(batch_size_fn=batch_size_fn, length_fn=length_fn, window_size=window_size,
                         separator=separator)
        self.peak_flops = peak_flops
        self._flops_per_token: dict[int, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        if peak == "measure":
            dtype = compute_dtype(str(trainer.precision))
            peak = measure_matmul_flops(dtype, device=trainer.strategy.root_device)
            rank_zero_info(f"TokenThroughputMonitor: measured {dtype} matmul peak {peak / 1e9:.0f} GFLOP/s "
                           f"({torch.get_num_threads()} threads); MFU is relative to it.")
        if peak is not None:
            _set_peak_flops(self, float(peak))

    def _set_flops(self, pl_module: LightningModule, batch: Any, factor: float) -> None:
        input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        T = int(input_ids.shape[-1])
        if T not in self._flops_per_token:
            self._flops_per_token[T] = model_flops_per_token(pl_module, T)
        # Lightning's ThroughputMonitor reads `flops_per_batch` from the module.
        pl_module.flops_per_batch = self._flops_per_token[T] * input_ids.numel() * factor

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._set_flops(pl_module, batch, 1.0)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._set_flops(pl_module, batch, 1.0 / 3.0)  # forward only


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Trainer `precision` setting (e.g. "bf16-mixed" -> bfloat16)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _set_peak_flops(monitor: ThroughputMonitor, peak: float) -> None:
    """A private Lightning access (the other is `LMCLI._parse_ckpt_path`): `ThroughputMonitor` takes its peak FLOP/s only from
    Lightning's table of GPUs, with no argument to give one, and keeps a `Throughput` per stage in its
    private `_throughputs`. On CPU (no table) MFU needs our measured or given peak, so it is set there."""
    monitor.available_flops = peak
    for throughput in monitor._throughputs.values():
        throughput.available_flops = peak
