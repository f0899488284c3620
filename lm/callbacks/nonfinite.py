"""`NonFiniteGuard`: stop at the first NaN/inf loss, gradient norm or validation loss, with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lm.callbacks.checkpoint import last_good_checkpoint
from lm.errors import LMError


class NonFiniteLossError(LMError):
    """Training produced a NaN/inf loss or gradient; the message says where and what to do."""


class NonFiniteGuard(Callback):
    """Stop at the first non-finite training loss, gradient norm or validation loss, with a clear error.

    Where it checks, and why nothing bad gets saved:
    - the training loss, before backward (`on_before_backward`): the bad step never updates the weights;
    - the gradient norm, before the optimizer step (a finite loss can still overflow in backward);
    - `val/loss` (the `monitor` metric) at the end of validation, before `ModelCheckpoint` runs
      (Lightning always runs checkpoint callbacks last).
    It raises `NonFiniteLossError` (`lm fit` prints it as one line and exits with status 2), naming
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
