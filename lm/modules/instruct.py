"""`InstructionTuner`: instruction following on an `lm` backbone, full fine-tuning or LoRA.

    lm finetune fit --config experiments/finetune/alpaca.yaml --model.init_args.backbone pretrain.ckpt
    lm finetune fit --config experiments/finetune/alpaca.yaml --model.init_args.lora_rank 8     # LoRA
    lm merge --ckpt_path checkpoints/alpaca/last.ckpt --output alpaca.ckpt    # a plain lm checkpoint

- loss: token NLL on the response only (the DataModule sets the prompt's labels to -100);
- `lora_rank > 0`: low-rank adapters on the attention and MLP projections (lm/modules/lora.py),
  everything else frozen; `lora_rank = 0`: every weight trains;
- `merged_model()` folds the adapters into the weights: a plain `GPT` again, which `lm merge` writes
  as an ordinary `lm` checkpoint (`lm generate --template alpaca`, `lm eval --pairs_file` read it).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lm.evaluation.token_losses import token_nll
from lm.model import GPT
from lm.modules.finetune import FinetuneModule
from lm.modules.lora import DEFAULT_TARGETS, add_lora, merge_lora


class InstructionTuner(FinetuneModule):
    """Causal LM loss on responses, on a pre-trained backbone.

    Args:
        backbone: Checkpoint written by `lm fit` (architecture, weights and tokenizer come from it).
        lora_rank: Rank of the LoRA adapters (0: full fine-tuning).
        lora_alpha: LoRA scale numerator (the update is alpha / rank * B A).
        lora_dropout: Dropout on the adapters' input.
        lora_targets: Names of the nn.Linear layers that get adapters.
        pretrained: Start from the backbone's weights (false: random init, for comparison).
        backbone_dropout: Dropout inside the backbone while tuning (null: the checkpoint's).
        learning_rate: Peak learning rate after warm-up (cosine decay to a tenth).
        weight_decay: AdamW weight decay on linear weights.
        warmup_steps: Linear warm-up steps.
        max_steps: Length of the cosine schedule (default: the Trainer's total steps).
        config: Filled in from the backbone (saved so the checkpoint reloads without it); leave unset.
    """

    def __init__(self, backbone: Optional[str] = None, lora_rank: int = 0, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.05, lora_targets: list[str] = list(DEFAULT_TARGETS), pretrained: bool = True,
                 backbone_dropout: Optional[float] = 0.0, learning_rate: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 20, max_steps: Optional[int] = None, config: Optional[dict] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = self._init_backbone(backbone, config, pretrained, backbone_dropout)
        if lora_rank:
            add_lora(self.model, lora_targets, lora_rank, lora_alpha, lora_dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        input_ids, labels = batch
        nll, count = token_nll(self(input_ids), labels)
        return nll / count.clamp(min=1), int(count)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, count = self._loss(batch)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=count)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        # Weighted by response tokens, so val/loss is the token-weighted NLL of the held-out responses.
        self.log("val/loss", loss, prog_bar=True, batch_size=count)

    def merged_model(self) -> GPT:
        """The backbone with any adapters folded into its weights (a plain GPT; this module is changed)."""
        return merge_lora(self.model) if self.hparams.lora_rank else self.model
