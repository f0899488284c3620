"""`SequenceClassifier`: sentence classification on a pre-trained `lm` backbone.

    lm finetune fit --config experiments/finetune/sst2.yaml --model.init_args.backbone path/to/lm.ckpt

- features: the backbone's final-norm hidden states (`GPT.forward(return_hidden=True)`), pooled
  from the last real token (the `<|endoftext|>` after the sentence) or averaged over the real tokens;
- a dropout + linear head on top; `train_blocks` chooses what of the backbone trains: 0 = frozen
  (a linear probe), N = the last N blocks and the final norm, null = everything;
- metrics from torchmetrics: accuracy, macro-F1 and the confusion matrix (`classification_metrics`,
  shared with `lm eval --labelled_file` through lm/evaluation/labelled_file.py);
- `pretrained: false` builds the same architecture with fresh weights: the random-init baseline.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lm.errors import LMError
from lm.modules.finetune import FinetuneModule


def classification_metrics(num_classes: int) -> MetricCollection:
    """acc (micro accuracy), f1 (macro-F1: every class counts alike) and the confusion matrix
    (rows: true class, columns: predicted)."""
    return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro"),
                             "f1": MulticlassF1Score(num_classes, average="macro"),
                             "confusion_matrix": MulticlassConfusionMatrix(num_classes)})


def pool(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """(B, T, H) right-padded hidden states -> (B, H): the last real token's, or the mean over real tokens."""
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


class SequenceClassifier(FinetuneModule):
    """A classification head on a GPT backbone.

    Args:
        backbone: Checkpoint written by `lm fit` (architecture, weights and tokenizer come from it).
        num_classes: Number of labels (0 .. num_classes - 1).
        pooling: `last` (hidden state of the end-of-text token after the sentence) or `mean`.
        train_blocks: Backbone blocks that train, counted from the top: 0 freezes the backbone
            (only the head learns), N trains the last N blocks and the final norm, null trains all.
        pretrained: Start from the backbone's weights (false: same architecture, random init).
        backbone_dropout: Dropout inside the backbone while fine-tuning (null: the checkpoint's).
        head_dropout: Dropout on the pooled features.
        learning_rate: Peak learning rate after warm-up (cosine decay to a tenth).
        weight_decay: AdamW weight decay on linear weights.
        warmup_steps: Linear warm-up steps.
        max_steps: Length of the cosine schedule (default: the Trainer's total steps).
        config: Filled in from the backbone (saved so the checkpoint reloads without it); leave unset.
    """

    def __init__(self, backbone: Optional[str] = None, num_classes: int = 2, pooling: Literal["last", "mean"] = "last",
                 train_blocks: Optional[int] = None, pretrained: bool = True, backbone_dropout: Optional[float] = 0.1,
                 head_dropout: float = 0.1, learning_rate: float = 1e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 20, max_steps: Optional[int] = None, config: Optional[dict] = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise LMError(f"num_classes must be at least 2, got {num_classes}.")
        self.save_hyperparameters()
        self.model = self._init_backbone(backbone, config, pretrained, backbone_dropout)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.model.config.hidden_size, num_classes))
        self._freeze(train_blocks)
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.confusion_matrix: Optional[list[list[int]]] = None  # of the last test run

    def _freeze(self, train_blocks: Optional[int]) -> None:
        if train_blocks is None:
            return
        layers = self.model.layers
        if not 0 <= train_blocks <= len(layers):
            raise LMError(f"train_blocks must be between 0 and {len(layers)} (the backbone's blocks) or null, "
                             f"got {train_blocks}.")
        trainable = list(layers[len(layers) - train_blocks:]) + ([self.model.norm] if train_blocks else [])
        self.model.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Class logits (B, num_classes) of right-padded sentences."""
        hidden = self.model(input_ids, return_hidden=True)
        return self.head(pool(hidden, lengths, self.hparams.pooling))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, lengths, labels = batch
        loss = F.cross_entropy(self(input_ids, lengths), labels)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(labels))
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor, Tensor], prefix: str, metrics: MetricCollection) -> None:
        input_ids, lengths, labels = batch
        logits = self(input_ids, lengths)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), batch_size=len(labels), prog_bar=prefix == "val")
        metrics.update(logits.argmax(-1), labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def _log_metrics(self, prefix: str, metrics: MetricCollection) -> dict[str, Any]:
        values = metrics.compute()
        metrics.reset()
        self.log(f"{prefix}/acc", values["acc"])
        self.log(f"{prefix}/f1", values["f1"], prog_bar=prefix == "val")
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        matrix = self._log_metrics("test", self.test_metrics)["confusion_matrix"]
        self.confusion_matrix = matrix.tolist()
        rank_zero_info(f"test confusion matrix (rows: true label, columns: predicted): {self.confusion_matrix}")
