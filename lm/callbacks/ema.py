"""`ExponentialMovingAverage`: validate, save and finish with a moving average of the weights.

Lightning's `EMAWeightAveraging` (torch.optim.swa_utils.AveragedModel underneath) swaps the averaged
weights in for validation, writes them as the checkpoint's `state_dict` (the raw weights go to
`current_model_state`, so `--ckpt_path last` resumes the raw run) and copies them into the model when
training ends. This subclass fixes two things for `lm`:

- until averaging starts (`update_starting_at_step`), the average *is* the current weights. Lightning's
  keeps the initial weights until then, so a run shorter than the start step would validate, save and
  finish with its untrained initialization;
- only parameters are averaged and swapped: the model's buffers (rotary tables, the tokenizer's byte
  lengths, the context cache's calibration) are not weights, and integer buffers must not go through a
  float average. The checkpoint's `state_dict` takes them from the model, not from the average's copy
  (made when the run started: a buffer set since, like a calibration, would be saved stale).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import EMAWeightAveraging

from lm.errors import LMError


class ExponentialMovingAverage(EMAWeightAveraging):
    """Moving average of the weights, updated after every optimizer step from `update_starting_at_step` on.

    Args:
        decay: Weight of the running average at each update; 0.99 averages over roughly the last 100 steps.
        update_starting_at_step: First optimizer step (0-based) that enters the average; before it the
            average follows the weights (the first steps are far from anything worth averaging).
        update_every_n_steps: Update the average every N optimizer steps.
        device: Where the averaged copy lives (default: the model's device).
    """

    def __init__(self, decay: float = 0.99, update_starting_at_step: int = 100, update_every_n_steps: int = 1,
                 device: Optional[Any] = None) -> None:
        if not 0.0 < decay < 1.0:
            raise LMError(f"ExponentialMovingAverage decay must be in (0, 1), got {decay}: e.g. 0.99.")
        super().__init__(device=device, use_buffers=False, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise LMError(f"ExponentialMovingAverage keeps a full copy of the model, and {type(trainer.strategy).__name__} "
                          f"shards it (FSDP modules cannot be copied): drop the callback for sharded runs (the FSDP "
                          f"overlays in experiments/trainer/ set trainer.callbacks: []) or train with DDP.")
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            state = checkpoint["state_dict"]
            for name, buffer in pl_module.named_buffers():
                if name in state:  # persistent buffers only
                    state[name] = buffer.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step == 0:  # not averaging yet: the "average" follows the weights
            self._copy_current_to_average(pl_module)

    def _copy_current_to_average(self, pl_module) -> None:
        for average, current in zip(self._average_model.module.parameters(), pl_module.parameters()):
            average.data.copy_(current.data)

    def _swap_models(self, pl_module) -> None:
        for average, current in zip(self._average_model.module.parameters(), pl_module.parameters()):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)

    def _copy_average_to_current(self, pl_module) -> None:
        for average, current in zip(self._average_model.module.parameters(), pl_module.parameters()):
            current.data.copy_(average.data)
