"""`LastStepCheckpoint`: Lightning's ModelCheckpoint whose `last.ckpt` always holds a finished fit's final step,
and `last_good_checkpoint`, the newest checkpoint a run wrote (for error messages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastStepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose `last.ckpt` always holds the final step of a finished fit.

    With a monitored metric, Lightning saves `last.ckpt` only when it checks the metric (after each
    validation, or every `every_n_train_steps`), and at the end of training only if it never saved
    one: the steps after the last validation were lost. Here `on_train_end` writes it once more when
    the run has moved on since the last save. A run stopped by `NonFiniteGuard` raises instead of
    ending, so its `last.ckpt` keeps the last finite weights.
    """

    _saved_at_step: Optional[int] = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every save of this callback writes last.ckpt too (save_last), so this is last.ckpt's step.
        self._saved_at_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.last_model_path and self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.last_model_path)


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
