"""`LastStepCheckpoint`: Lightning's ModelCheckpoint whose `last.ckpt` always holds a finished fit's final step
(and whose final weights are always validated);
`last_good_checkpoint`, the newest checkpoint a run wrote (for error messages); and what keeps a run from
training for hours to save nothing: `check_run_outputs` (checkpoints/ and logs/ writable, with room for
the checkpoints, before training starts) and `DurableCheckpointIO` (a failed save stops the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lm.errors import LMError
from lm.io.files import atomic_write_with, check_writable_folder

# AdamW keeps two fp32 moments per parameter (exp_avg, exp_avg_sq) beside the fp32 weights.
ADAMW_STATE_PER_PARAMETER = 2


class LastStepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose `last.ckpt` always holds the final step of a finished fit.

    With a monitored metric, Lightning saves `last.ckpt` only when it checks the metric (after each
    validation, or every `every_n_train_steps`), and at the end of training only if it never saved
    one: the steps after the last validation were lost. Here `on_train_end` writes it once more when
    the run has moved on since the last save. A run stopped by `NonFiniteGuard` raises instead of
    ending, so its `last.ckpt` keeps the last finite weights.

    The final weights are also validated, so the best checkpoint can be the last step: Lightning validates
    on the way out only when something sets `should_stop` (max_time's Timer, early stopping), and a fit
    that ended by max_steps or max_epochs between two `val_check_interval` points never validated them.
    Here the last batch of such a fit asks for the stop, and Lightning validates it.
    """

    _saved_at_step: Optional[int] = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if _is_last_training_batch(trainer):
            trainer.should_stop = True
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every save of this callback writes last.ckpt too (save_last), so this is last.ckpt's step.
        self._saved_at_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.last_model_path and self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.last_model_path)


def _is_last_training_batch(trainer: Trainer) -> bool:
    """Whether the batch that just ran is the fit's last one by `max_steps` or `max_epochs`."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


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


class CheckpointSaveError(LMError):
    """A checkpoint could not be written (no space, no permission): the run stops instead of going on unsaved."""


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, minus its silence: Lightning's `_atomic_save` swallows a
    `PermissionError` (a read-only or immutable folder), so a run trained to the end, saved nothing and
    exited 0. Here the file goes through `lm.io.files.atomic_write_with` (temporary file in the same folder,
    fsync, rename: a kill leaves the old checkpoint or the new one) and any OS error stops the run with
    `CheckpointSaveError`. Remote paths (`s3://...`) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_write_with(path, lambda f: torch.save(checkpoint, f))
        except OSError as error:
            raise CheckpointSaveError(
                f"Could not write the checkpoint {path} ({error.strerror or error}); training stopped so that no "
                f"more steps go unsaved. Free space or fix the folder's permissions, then resume with "
                f"--ckpt_path last.") from error


def use_durable_checkpoint_io(trainer: Trainer) -> None:
    """Make the trainer write checkpoints with `DurableCheckpointIO` (unless a custom CheckpointIO was chosen)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = DurableCheckpointIO()


def expected_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Approximate size of one training checkpoint: the weights plus AdamW's two moments per parameter
    (a shared tensor, e.g. tied embeddings, counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    moments = sum(p.numel() * 4 for p in unique if p.requires_grad) * ADAMW_STATE_PER_PARAMETER
    return weights + moments


def check_run_outputs(trainer: Trainer, model: torch.nn.Module) -> None:
    """Before training: each checkpoint folder is a writable folder with room for the checkpoints it keeps
    (top-k + last.ckpt + the one being written beside them), and the log folder is a writable folder.
    Temporary files of a save that a kill interrupted (`.<name>.ckpt.*.tmp`, never read) are removed."""
    size = expected_checkpoint_bytes(model)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and "://" not in str(callback.dirpath):
            for stale in Path(callback.dirpath).glob(".*.ckpt.*.tmp"):  # half a save, left by a killed run
                stale.unlink(missing_ok=True)
            kept = max(callback.save_top_k, 1) + bool(callback.save_last) + 1
            check_writable_folder(callback.dirpath, "checkpoint folder", "--experiment NAME or --checkpoint.dirpath DIR",
                                  need_bytes=size * kept)
    for logger in trainer.loggers:  # the run's folder, not version_N: the logger numbers versions itself
        folder = getattr(logger, "root_dir", None) or logger.save_dir
        if folder and "://" not in str(folder):
            check_writable_folder(folder, "log folder", "--trainer.logger.init_args.save_dir DIR")
