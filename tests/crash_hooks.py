"""Test-only: `KillPoint`, a callback that freezes a `lm fit` process at one chosen moment so a test's
SIGKILL lands exactly there (tests/test_crash_safety.py). Added with
`--trainer.callbacks+=tests.crash_hooks.KillPoint --trainer.callbacks.init_args.moment ...`."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

MOMENTS = ("train_step", "validation", "checkpoint_save")


class KillPoint(Callback):
    """At `moment` of optimizer step `step`, write `marker` and sleep until killed.

    - train_step: inside the training step, after the forward pass (`on_before_backward`);
    - validation: after the second batch of the validation that runs at `step`;
    - checkpoint_save: in the middle of writing the first checkpoint file of `step`: half its bytes are
      in the temporary file when the process freezes.
    """

    def __init__(self, moment: str, step: int, marker: str) -> None:
        if moment not in MOMENTS:
            raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
        self.moment, self.step, self.marker = moment, step, marker

    def _freeze(self) -> None:
        Path(self.marker).write_text(self.moment)
        time.sleep(600)  # the test kills the process now

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.moment == "train_step" and trainer.global_step == self.step:
            self._freeze()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (self.moment == "validation" and not trainer.sanity_checking and trainer.global_step == self.step
                and batch_idx == 1):
            self._freeze()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.moment != "checkpoint_save" or trainer.global_step != self.step:
            return
        real_save = torch.save

        def half_then_freeze(obj, f, *args, **kwargs) -> None:  # the next torch.save: the file write
            torch.save = real_save
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            self._freeze()

        torch.save = half_then_freeze
