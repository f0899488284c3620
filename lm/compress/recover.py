"""`KeepPrunedZeros`: the recovery fine-tune after `lm prune` keeps the pruned weights at zero
(experiments/finetune_pruned.yaml).

The run starts from the pruned checkpoint's weights with `--model.init_from` (lm/modules/init_from.py:
weights only, architecture and tokenizer checked, new optimizer and schedule). Without this callback
the optimizer would move the zeroed weights again and the model would lose the sparsity it was
pruned to; with it, every weight matrix entry that is exactly zero when fitting starts is set back
to zero after each optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from lm.errors import LMError


class KeepPrunedZeros(Callback):
    """Hold at zero the weight-matrix entries that are zero when fitting starts.

    The mask is taken in `on_fit_start`, after `--model.init_from` loaded the pruned weights (in
    `setup`) and after a `--ckpt_path` resume restored its own, so both start from the pruned zeros.
    Only 2-D weights are masked (biases and norms are never pruned)."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(trainer, "ckpt_path", None) and not pl_module.hparams.get("init_from"):
            raise LMError("KeepPrunedZeros keeps a pruned model's zeros, but this run starts from random weights: "
                          "pass --model.init_from with the checkpoint `lm prune` wrote.")
        self.masks = {name: p.detach() != 0 for name, p in pl_module.model.named_parameters()
                      if p.dim() == 2 and bool((p == 0).any())}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for name, p in pl_module.model.named_parameters():
            if name in self.masks:
                p.mul_(self.masks[name])
