"""Training callbacks for `lm fit`, each selectable from YAML (overlays in experiments/trainer/callbacks/).

- `TokenThroughputMonitor`: Lightning's `ThroughputMonitor` set up for `(input_ids, targets)` batches:
  logs tokens/s (`train/device/items_per_sec`), samples/s, FLOP/s and, given a peak FLOP/s (or
  `peak_flops: measure`), MFU (`train/device/mfu`). FLOPs come from `GPT.flops_per_token`.
- `TextSampler`: every N optimizer steps, completes fixed prompts with the model being trained and
  logs them as text (TensorBoard's TEXT tab, or a W&B table).
- `NonFiniteGuard`: stops training with a clear error the first time the loss (or the gradients, or
  the validation loss) is NaN/inf, naming the step and the last good checkpoint. It raises *before*
  the bad step's optimizer update and before any checkpoint of that step is written, so the last
  good checkpoint is never overwritten with NaN weights.
- `batch_size`, `num_tokens`: the functions Lightning's own `ThroughputMonitor` needs, importable by
  path from YAML (`batch_size_fn: lm.callbacks.batch_size`).
- `measure_matmul_flops`: a quick matmul peak of this machine (FLOP/s), the denominator of MFU on CPU
  where Lightning has no table of peaks.

Several overlays can be combined: they append to `trainer.callbacks` with the `callbacks+:` key
(jsonargparse's list append), e.g.

    lm fit --config experiments/wikitext2_cpu.yaml --config experiments/trainer/callbacks/throughput.yaml \\
           --config experiments/trainer/callbacks/text_sampler.yaml
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

__all__ = [
    "batch_size",
    "num_tokens",
    "measure_matmul_flops",
    "model_flops_per_token",
    "LastStepCheckpoint",
    "TokenThroughputMonitor",
    "TextSampler",
    "NonFiniteGuard",
    "NonFiniteLossError",
]


# ------------------------------------------------------------------------------ checkpoints
class LastStepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose `last.ckpt` always holds the final step of a finished fit.

    With a monitored metric, Lightning saves `last.ckpt` only when it checks the metric (after each
    validation, or every `every_n_train_steps`), and at the end of training only if it never saved
    one: steps after the last validation were lost (max_steps 450 with validation every 100 ended
    with a `last.ckpt` of step 400). Here `on_train_end` writes it once more when the run has moved on
    since. A run stopped by `NonFiniteGuard` raises instead of ending, so its `last.ckpt` keeps the
    last finite weights.
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_checkpoint_saved and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)


# ------------------------------------------------------------------------------ batch helpers
def batch_size(batch: Any) -> int:
    """Sequences in an `(input_ids, targets)` batch (or a bare `input_ids` tensor)."""
    input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(input_ids.shape[0])


def num_tokens(batch: Any) -> int:
    """Tokens fed to the model in an `(input_ids, targets)` batch: batch x sequence length."""
    input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(input_ids.numel())


# --------------------------------------------------------------------------------------- FLOPs
def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0,
                         device: Union[str, torch.device] = "cpu") -> float:
    """Best FLOP/s of a square `size` matmul in `dtype` on `device`, with torch's current thread count.

    A practical peak of this machine (what its BLAS reaches on a large matmul), for MFU where no
    datasheet number exists (CPUs). Takes about `seconds` plus a warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size ** 3
    for _ in range(2):  # warm-up: thread pool, BLAS kernel selection
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start > seconds:  # no fast kernel for this dtype (bf16 on AVX2): stop here
            return flops / (time.perf_counter() - start)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = max(best, flops / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def model_flops_per_token(pl_module: LightningModule, sequence_length: int) -> float:
    """Training FLOPs per token (forward + backward) of the module's network: `GPT.flops_per_token`
    when it has one, else 6 x parameters (the matmul estimate)."""
    net = _unwrap(getattr(pl_module, "model", pl_module))
    if hasattr(net, "flops_per_token"):
        return float(net.flops_per_token(sequence_length))
    return 6.0 * sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------- throughput
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
            raise ValueError(f"window_size must be >= 2 (a rate needs two time points), got {window_size}.")
        super().__init__(batch_size_fn=batch_size_fn, length_fn=length_fn, window_size=window_size,
                         separator=separator)
        self.peak_flops = peak_flops
        self._flops_per_token: dict[int, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        if peak == "measure":
            from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            peak = measure_matmul_flops(dtype, device=trainer.strategy.root_device)
            rank_zero_info(f"TokenThroughputMonitor: measured {dtype} matmul peak {peak / 1e9:.0f} GFLOP/s "
                           f"({torch.get_num_threads()} threads); MFU is relative to it.")
        if peak is not None:
            self.available_flops = float(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = float(peak)

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


# -------------------------------------------------------------------------------- text samples
class TextSampler(Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training), complete `prompts` with
    the model being trained and log them as text.

    TensorBoard: one markdown entry per sampling step under `tag` (TEXT tab; stored as the tensor
    `<tag>/text_summary`). Loggers without `add_text` but with `log_text` (W&B) get a table with
    columns step / prompt / completion. The samples are also kept in `self.history` and, with
    `verbose`, printed.

    Sampling uses its own seeded generator: it does not consume the training RNG, so runs with and
    without this callback train identically. Generation runs on rank 0 only, which is fine for
    single-device and DDP training (not for sharded models, whose forward needs every rank).

    Args:
        prompts: Text prompts, completed as one batch.
        every_n_steps: Sample when `trainer.global_step` is a multiple of this (0: only at the end).
        max_new_tokens: Tokens generated per prompt.
        temperature: Sampling temperature (0 = greedy).
        top_k: Sample among the k most likely tokens.
        top_p: Nucleus sampling threshold.
        seed: Seed of the sampler (the same seed at every step, so samples differ only by training).
        tag: Text tag in the logger.
        on_train_end: Also sample once when training ends (if the last step was not sampled already).
        verbose: Print the samples too.
    """

    def __init__(self, prompts: list[str] = ["The", " = = History = ="], every_n_steps: int = 100,
                 max_new_tokens: int = 32, temperature: float = 0.8, top_k: Optional[int] = 50,
                 top_p: Optional[float] = None, seed: int = 1234, tag: str = "samples", on_train_end: bool = True,
                 verbose: bool = False) -> None:
        super().__init__()
        if not prompts:
            raise ValueError("TextSampler needs at least one prompt.")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}.")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.tag = tag
        self.sample_on_train_end = on_train_end
        self.verbose = verbose
        self.history: list[tuple[int, list[str]]] = []
        self._last_sampled_step = -1

    def sample(self, pl_module: LightningModule) -> list[str]:
        from lm.model.generate import generate_text

        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("TextSampler: the module has no tokenizer (it is set from the DataModule in setup).")
        model = _unwrap(pl_module.model)
        max_new = min(self.max_new_tokens, model.config.max_position_embeddings - 1)
        return generate_text(model, tokenizer, self.prompts, max_new_tokens=max_new, temperature=self.temperature,
                             top_k=self.top_k, top_p=self.top_p, seed=self.seed, truncate=True)

    @rank_zero_only
    def _sample_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_sampled_step:
            return
        self._last_sampled_step = step
        completions = self.sample(pl_module)
        self.history.append((step, completions))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
                experiment.add_text(self.tag, self.format_markdown(completions), global_step=step)
            elif hasattr(logger, "log_text"):  # W&B
                logger.log_text(key=self.tag, columns=["step", "prompt", "completion"],
                                data=[[step, p, c] for p, c in zip(self.prompts, completions)], step=step)
        if self.verbose:
            lines = "\n".join(f"  {p!r} -> {c!r}" for p, c in zip(self.prompts, completions))
            rank_zero_info(f"Samples at step {step}:\n{lines}")

    def format_markdown(self, completions: list[str]) -> str:
        """One fenced block per prompt: the prompt, then the completion after a `▶` marker."""
        blocks = []
        for prompt, completion in zip(self.prompts, completions):
            text = f"{prompt}▶{completion}".replace("```", "'''")
            blocks.append(f"```\n{text}\n```")
        return "\n\n".join(blocks)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sample_on_train_end and trainer.global_step > 0:
            self._sample_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_sampled_step": self._last_sampled_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_sampled_step = state_dict.get("last_sampled_step", -1)


# ----------------------------------------------------------------------------------- NaN guard
class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message says where and what to do."""


class NonFiniteGuard(Callback):
    """Stop at the first non-finite training loss, gradient norm or validation loss, with a clear error.

    Where it checks, and why nothing bad gets saved:
    - the training loss, before backward (`on_before_backward`): the bad step never updates the weights;
    - the gradient norm, before the optimizer step (a finite loss can still overflow in backward);
    - `val/loss` (the `monitor` metric) at the end of validation, before `ModelCheckpoint` runs
      (Lightning always runs checkpoint callbacks last).
    It raises `NonFiniteLossError` (`lm fit` prints it as one line and exits with status 1), naming
    the step and the last checkpoint written, which holds finite weights and can be resumed with
    `--ckpt_path`.

    Args:
        check_gradients: Also check the global gradient norm before each optimizer step (one pass over
            the gradients; skipped under `16-mixed`, whose gradient scaler skips inf steps by design).
        monitor: Validation metric to check (None: don't check validation).
    """

    def __init__(self, check_gradients: bool = True, monitor: Optional[str] = "val/loss") -> None:
        super().__init__()
        self.check_gradients = check_gradients
        self.monitor = monitor

    # ---------------------------------------------------------------------------------- checks
    def _any_rank(self, trainer: Trainer, bad: bool) -> bool:
        if trainer.world_size > 1:  # every rank must stop together, or the others hang in all-reduce
            return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        value = loss.detach()
        bad = not bool(torch.isfinite(value).all())
        if self._any_rank(trainer, bad):
            self._stop(trainer, pl_module, f"Loss became {_describe(value)}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not self.check_gradients or str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        bad = not bool(torch.isfinite(norm))
        if self._any_rank(trainer, bad):
            self._stop(trainer, pl_module, f"Gradient norm became {_describe(norm)}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            self._stop(trainer, pl_module, f"{self.monitor} became {_describe(torch.as_tensor(value))}")

    # ----------------------------------------------------------------------------------- report
    def _stop(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        step = trainer.global_step
        checkpoint = last_good_checkpoint(trainer)
        if checkpoint is None:
            where = "no checkpoint was written before it"
            resume = ""
        else:
            path, ckpt_step = checkpoint
            path = _display_path(path)
            where = f"last good checkpoint: {path} (step {ckpt_step})"
            resume = f" Resume from the checkpoint with --ckpt_path {path}."
        lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        lr = f" (now {max(lrs):.3g})" if lrs else ""
        advice = ("Lower the learning rate" + lr + ", lengthen warm-up (model.warmup_steps), keep "
                  "trainer.gradient_clip_val set, or train in 32-true / bf16-mixed rather than 16-mixed.")
        message = (f"{what} at step {step} (epoch {trainer.current_epoch}); {where}. Training stopped before this "
                   f"step's update, so no checkpoint holds non-finite weights. {advice}{resume}")
        raise NonFiniteLossError(message)


def _display_path(path: str) -> str:
    """`path` relative to the working directory when it is inside it (as `lm` prints paths), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _describe(value: Tensor) -> str:
    value = value.float()
    if bool(torch.isnan(value).any()):
        return "nan"
    return "inf" if bool((value > 0).all()) else "-inf"


def last_good_checkpoint(trainer: Trainer) -> Optional[tuple[str, int]]:
    """(path, global step) of the most recent checkpoint written by the run's ModelCheckpoints."""
    candidates = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates.update(p for p in (callback.last_model_path, callback.best_model_path, *callback.best_k_models)
                              if p)
    best: Optional[tuple[str, int]] = None
    for path in candidates:
        if not Path(path).is_file():
            continue
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
        except Exception:  # unreadable: not a good checkpoint
            continue
        if best is None or step > best[1] or (step == best[1] and Path(path).name == "last.ckpt"):
            best = (path, step)
    return best
