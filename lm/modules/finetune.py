"""`FinetuneModule`: what the fine-tuning LightningModules (classifier.py, instruct.py) share.

- the backbone: a `GPT` built from an `lm` checkpoint's config, with its weights (`pretrained=True`)
  or freshly initialized (`pretrained=False`: the random-init baseline of the same recipe), and the
  checkpoint's tokenizer, which the task DataModule then tokenizes with;
- self-contained checkpoints: the backbone's config goes into the hyper-parameters (`config`) and the
  tokenizer into the checkpoint, so a fine-tuned `.ckpt` reloads without the backbone file;
- AdamW (decay on linear weights only, lm/modules/optimizers.py) over the parameters left trainable, with linear
  warm-up and cosine decay.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch

from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.model import GPT, GPTConfig, build_gpt
from lm.modules.init_from import checkpoint_parts
from lm.modules.language_model import attached_trainer
from lm.modules.optimizers import build_optimizer, warmup_cosine


class FinetuneModule(L.LightningModule):
    """Subclasses call `self._init_backbone(...)` in `__init__` after `save_hyperparameters()`; their
    hyper-parameters must include learning_rate, weight_decay, warmup_steps and max_steps."""

    def _init_backbone(self, backbone: Optional[str], config: Optional[dict], pretrained: bool,
                       dropout: Optional[float]) -> GPT:
        self.tokenizer = None
        parts = None
        if config is None:  # a new run: read the backbone checkpoint (a reload has `config` and its own weights)
            if not backbone:
                raise LMError("No backbone: set --model.init_args.backbone to a checkpoint written by `lm fit`.")
            parts = checkpoint_parts(backbone)
            config = parts.config.to_dict()
        gpt_config = GPTConfig.from_dict(config)
        if dropout is not None:
            gpt_config.dropout = dropout
        self.hparams["config"] = gpt_config.to_dict()  # plain types: checkpoints load with weights_only=True
        model = build_gpt(gpt_config)
        if parts is not None:
            if pretrained:
                model.load_state_dict(parts.state_dict)
            if parts.tokenizer_json is not None:
                self.tokenizer = Tokenizer.from_str(parts.tokenizer_json)
        return model

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """Hand the backbone's tokenizer and context to the task DataModule (it tokenizes lazily)."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        if self.tokenizer is None and getattr(datamodule, "tokenizer", None) is not None:
            # Reloaded for `lm finetune test --ckpt_path`: Lightning restores the checkpoint (and its
            # tokenizer) only after setup; the CLI has already handed that tokenizer to the DataModule.
            self.tokenizer = datamodule.tokenizer
        if self.tokenizer is None:
            raise LMError("The model has no tokenizer: its backbone checkpoint carries none. Use a checkpoint "
                             "written by `lm fit`.")
        if hasattr(datamodule, "set_tokenizer"):
            datamodule.set_tokenizer(self.tokenizer, max_length=self.model.config.max_position_embeddings)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_str()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer" in checkpoint:
            self.tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self, hp.learning_rate, hp.weight_decay, (0.9, 0.95), fused=False)
        max_steps = hp.max_steps or int(self.trainer.estimated_stepping_batches)
        if not math.isfinite(max_steps) or max_steps <= 0:
            raise LMError("Cannot infer the schedule length: set trainer.max_steps or model.max_steps.")
        warmup = min(hp.warmup_steps, max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, max_steps, 0.1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
