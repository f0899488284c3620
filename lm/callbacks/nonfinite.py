"""`NonFiniteGuard`: stop at the first NaN/inf loss, gradient norm or validation loss, with a clear error;
or skip such training steps, counted and logged, up to a limit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lm.callbacks.checkpointing import last_good_checkpoint
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

    With `skip_steps: N` (N > 0) a non-finite training loss or gradient does not stop the run: that
    optimizer step is skipped instead (its gradients are dropped before the optimizer sees them, so the
    weights and AdamW's moments are untouched; the step counter and LR schedule move on, and with
    gradient accumulation the whole accumulated step is skipped). Each skip is a warning naming the step,
    and `train/nonfinite_skipped` (the run's total, kept in checkpoints across resumes) goes to
    TensorBoard. The (N+1)-th non-finite step stops the run with `NonFiniteLossError`: a few bad batches
    are noise, a steady stream is a diverging run. A non-finite `val/loss` always stops.

    Args:
        check_gradients: Also check the global gradient norm before each optimizer step (one pass over
            the gradients; skipped under `16-mixed`, whose gradient scaler skips inf steps by design).
        monitor: Validation metric to check (None: don't check validation).
        skip_steps: How many non-finite training steps to skip before stopping (0: stop at the first).
    """

    def __init__(self, check_gradients: bool = True, monitor: Optional[str] = "val/loss", skip_steps: int = 0) -> None:
        super().__init__()
        if skip_steps < 0:
            raise LMError(f"NonFiniteGuard skip_steps must be >= 0 (0 stops at the first non-finite step), got {skip_steps}.")
        self.check_gradients = check_gradients
        self.monitor = monitor
        self.skip_steps = skip_steps
        self.skipped = 0  # non-finite steps skipped so far in this run (restored on resume)
        self._bad_loss: Optional[Tensor] = None  # a non-finite loss of the step being accumulated

    # ---------------------------------------------------------------------------------- checks
    def _any_rank(self, trainer: Trainer, bad: bool) -> bool:
        if trainer.world_size > 1:  # every rank must stop together, or the others hang in all-reduce
            return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        value = loss.detach()
        if self.skip_steps:  # decided before the optimizer step, with the gradients (all ranks together)
            if self._bad_loss is None and not bool(torch.isfinite(value).all()):
                self._bad_loss = value
            return
        bad = not bool(torch.isfinite(value).all())
        if self._any_rank(trainer, bad):
            self._stop(trainer, pl_module, f"Loss became {_describe(value)}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not self.skip_steps and (not self.check_gradients or str(trainer.precision).startswith("16")):
            return
        what = None
        if self._bad_loss is not None:
            what = f"Loss became {_describe(self._bad_loss)}"
        elif self.check_gradients and not str(trainer.precision).startswith("16"):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads else None
            if norm is not None and not bool(torch.isfinite(norm)):
                what = f"Gradient norm became {_describe(norm)}"
        self._bad_loss = None
        if not self._any_rank(trainer, what is not None):
            if self.skip_steps:
                pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
            return
        what = what or "A non-finite loss or gradient on another process"
        if self.skipped >= self.skip_steps:
            limit = f" after {self.skipped} skipped non-finite steps (the limit, skip_steps)" if self.skip_steps else ""
            self._stop(trainer, pl_module, what + limit)
        self._skip(trainer, pl_module, optimizer, what)

    def _skip(self, trainer: Trainer, pl_module: LightningModule, optimizer, what: str) -> None:
        """Drop this step's gradients: the optimizer leaves every parameter without one untouched."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        rank_zero_warn(f"{what} at step {trainer.global_step}: step skipped, weights unchanged "
                       f"({self.skipped} of at most {self.skip_steps} non-finite steps skipped).")
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

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
