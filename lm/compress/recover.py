"""`StartFromWeights`: begin `lm fit` from a checkpoint's weights (not its training state), for the
short recovery fine-tune after `lm prune` (experiments/finetune_pruned.yaml).

Resuming with `--ckpt_path` would restore the optimizer and loops of a run that no longer matches;
this callback copies only the weights into the freshly built model, and, by default, keeps every
weight that the checkpoint holds at exactly zero at zero after each optimizer step, so an
unstructured-pruned model stays as sparse as it was pruned.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from lm.errors import LMError


class StartFromWeights(Callback):
    """Load a checkpoint's weights into the model when fitting starts (unless resuming with --ckpt_path).

    Args:
        ckpt_path: A checkpoint written by `lm prune` or `lm fit`; the run's model config must match its
            (for MLP-channel pruning: --model.config.intermediate_size as printed by `lm prune`).
        keep_zeros: Hold the weights that are zero in the checkpoint at zero during training.
    """

    def __init__(self, ckpt_path: str, keep_zeros: bool = True) -> None:
        self.ckpt_path = ckpt_path
        self.keep_zeros = keep_zeros
        self.masks: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "ckpt_path", None):
            return  # resuming this run: its own checkpoint already has the weights
        from lm.checkpoint import load_model

        source, tokenizer = load_model(self.ckpt_path)
        config: Optional[Any] = getattr(source, "config", None)
        try:
            pl_module.model.load_state_dict(source.state_dict())
        except RuntimeError as error:
            raise LMError(f"{self.ckpt_path} does not fit this run's model (config {config}): set the run's "
                             f"--model.config.* to the checkpoint's, e.g. --model.config.intermediate_size "
                             f"{getattr(config, 'intermediate_size', '?')}.") from error
        if pl_module.tokenizer is not None and pl_module.tokenizer.to_str() != tokenizer.to_str():
            raise LMError(f"{self.ckpt_path} was trained with another tokenizer than this run's data: pass "
                             f"--data.tokenizer_path with its tokenizer.json (`lm export --format safetensors` writes it).")
        if self.keep_zeros:
            self.masks = {name: p.detach() != 0 for name, p in pl_module.model.named_parameters()
                          if p.dim() == 2 and bool((p == 0).any())}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for name, p in pl_module.model.named_parameters():
            if name in self.masks:
                p.mul_(self.masks[name])
