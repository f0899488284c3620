"""`PreemptionCheckpoint`: SIGTERM, the way SLURM, Kubernetes and spot instances preempt a job, stops `lm fit`
at the next step boundary with a resumable `last.ckpt`, and the process exits 143 (128 + SIGTERM).

Lightning catches SIGTERM already: its handler sets `trainer.received_sigterm`, and the loops raise
`SIGTERMException` at the next training-batch or validation-batch boundary. That exception is a bare
`SystemExit`, so a preempted job ended with status 0 (its scheduler saw it as finished) and with whatever
checkpoint the last periodic save had left, or none. With this callback (on by default, lm/cli/lightning_cli.py):

- from the first training step on, SIGTERM only sets a flag here: a checkpoint being written when it lands
  is finished, never cut;
- Lightning is told at the next boundary a checkpoint resumes exactly from: the end of an optimizer step
  (`_resumes_exactly_after_this_batch` says which), after the validation in progress if there is one
  (`on_validation_start` says why);
- there `last.ckpt` is written through the trainer's checkpoint IO (`DurableCheckpointIO`: temporary file,
  fsync, rename), so a SIGKILL during that save still leaves the previous `last.ckpt`;
- one line on stderr says what was saved and how to resume (`lm fit ... --ckpt_path last`), and
  `run_lightning_cli` turns the exception into exit status 143.

It is a `Checkpoint` so that Lightning runs it after the ModelCheckpoints: its `on_validation_end` save then
holds their view of that validation (best score, top-k files), as an uninterrupted run's later saves do.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm.callbacks.checkpointing import last_good_checkpoint

PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class PreemptionCheckpoint(Checkpoint):
    """On SIGTERM during `fit`: finish the optimizer step (and a validation in progress), save `last.ckpt`, exit 143."""

    def __init__(self) -> None:
        self._lightning_handler: Any = None  # Lightning's SIGTERM handler, while this one is in its place
        self._pending = False  # a SIGTERM came: stop at the next boundary that resumes exactly
        self._lightning_told = False  # Lightning's handler has run for it
        self._saved: Optional[tuple[str, int]] = None  # (path, step) of the save made for it

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers are the main thread's: Lightning's own handling stays
        self._pending = self._lightning_told = trainer.received_sigterm  # one that came before the first step
        trainer._signal_connector.received_sigterm = False  # Lightning stops where `_stop_after_this_step` says
        self._lightning_handler = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self._pending = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._pending and _resumes_exactly_after_this_batch(trainer):
            self._stop_after_this_step(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A checkpoint taken mid-validation does not resume exactly, so a validation runs to its end and the run
        stops right after it (`on_validation_end`), in the state of the last completed training step. Lightning's
        loop state records the validation batches done but not their summed metrics, and a run resumed from it
        does not finish that validation: its val/loss is never logged nor seen by ModelCheckpoint, and the context
        cache is not calibrated on it. Worse, the EMA's average is swapped into the model until the validation
        ends: the checkpoint would hold the average as the raw weights, and the resumed run would train on from it."""
        if self._lightning_handler is not None and _fitting(trainer) and trainer.received_sigterm:
            # Told at the end of the step just before: Lightning would stop after the first validation batch.
            # It has no public way to postpone that, hence its private `_signal_connector`.
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Saved here rather than where Lightning stops (a little later in the step), because Lightning restores a
        # checkpoint taken at a validation's end as such: it neither repeats the validation nor counts the step twice.
        if _fitting(trainer) and self._pending and _resumes_exactly_after_this_batch(trainer):
            path = save_last_checkpoint(trainer)
            self._saved = (path, trainer.global_step) if path else None
            self._stop_after_this_step(trainer)

    def _stop_after_this_step(self, trainer: Trainer) -> None:
        """Set Lightning's flag: its loops raise `SIGTERMException` at the end of this step. Its handler runs once,
        now if it has not yet (its log line; its launcher passes the signal on to worker processes)."""
        if not self._lightning_told and callable(self._lightning_handler):
            self._lightning_handler(signal.SIGTERM, None)
        self._lightning_told = True
        trainer._signal_connector.received_sigterm = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handler()  # a SIGTERM during the last step: the run has finished, as it was asked to stop

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING:  # validate, test, predict: nothing to resume
            message = f"lm {trainer.state.fn.value}: stopped by SIGTERM; exit status {PREEMPTED_EXIT_STATUS}."
        else:
            message = preempted_message(trainer, self._checkpoint_to_resume(trainer))
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)

    def _checkpoint_to_resume(self, trainer: Trainer) -> Optional[tuple[str, int]]:
        """(path, step) of the `last.ckpt` saved for this stop: at the validation's end, or now."""
        if self._saved and self._saved[1] == trainer.global_step:
            return self._saved
        # In the sanity check, before the first step, or mid-validation (when this callback could not hold the
        # signal) no state resumes exactly: the newest checkpoint on disk stays the one to resume from.
        if trainer.global_step == 0 or trainer.sanity_checking or trainer.validating:
            return None
        path = save_last_checkpoint(trainer)
        return (path, trainer.global_step) if path else None

    def _restore_handler(self) -> None:
        if self._lightning_handler is not None:
            signal.signal(signal.SIGTERM, self._lightning_handler)
            self._lightning_handler = None


def _resumes_exactly_after_this_batch(trainer: Trainer) -> bool:
    """Whether a run stopped after this batch resumes exactly (Lightning's own rules, private, decide both):
    - not between the micro-batches of an accumulated step: the gradients summed so far live only in `.grad`,
      which no checkpoint holds, and the resumed step would miss part of its batch;
    - not after an epoch's last batch: Lightning restores a checkpoint taken there with the finished epoch's
      batch count still current, and the resumed run ends its next epoch after one batch (its epochs, data
      windows and losses then differ). The first step of the next epoch stops instead; after the run's last
      step, the run just finishes."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return not epoch_loop._should_accumulate() and not epoch_loop._is_training_done


def _fitting(trainer: Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def save_last_checkpoint(trainer: Trainer) -> Optional[str]:
    """Write the run's `last.ckpt` now, as its ModelCheckpoint would (None when no checkpoint callback keeps one)."""
    callback = next((c for c in trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath), None)
    if callback is None:
        return None
    path = callback.last_model_path or callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
    callback.last_model_path = path  # part of the state being saved: ModelCheckpoint sets it before its saves too
    trainer.save_checkpoint(path)
    return path


def preempted_message(trainer: Trainer, saved: Optional[tuple[str, int]]) -> str:
    """The one line a preempted `lm fit` prints: what it saved, and the command that resumes it."""
    newest = saved or last_good_checkpoint(trainer)
    if newest is None:
        return (f"lm fit: preempted by SIGTERM before its first checkpoint: run the same command again to start "
                f"over; exit status {PREEMPTED_EXIT_STATUS}.")
    what = (f"saved {saved[0]} at step {saved[1]}" if saved
            else f"nothing new to save, the newest checkpoint is {newest[0]} (step {newest[1]})")
    return (f"lm fit: preempted by SIGTERM: {what}. Resume with the same command and --ckpt_path last "
            f"(lm fit ... --ckpt_path last); exit status {PREEMPTED_EXIT_STATUS}.")
