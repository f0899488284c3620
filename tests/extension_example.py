"""A researcher's own model, defined outside `lm` (used by tests/test_variants_cli.py).

`ScaledAttentionModel` is selected with `lm fit --model tests.extension_example.ScaledAttentionModel`
(or `model: {class_path: tests.extension_example.ScaledAttentionModel}` in YAML) and trains,
checkpoints, validates and generates with no change to `lm`:
- `ScaledAttention` subclasses the stock attention and overrides `attend`: a learned temperature per
  head multiplies the queries (a distinctive parameter, `head_scale`, in every checkpoint);
- `build_model` passes it to `build_gpt(config, attention_class=...)` (a `GPT`, or with the recipe's context cache a
  `GPTWithContextCache`);
- `compute_loss` adds label smoothing to the training objective (validation keeps the plain NLL, so
  val/loss stays comparable with the stock model's).
The class counters let a test check that this code, not the stock one, ran.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.model import GPTConfig, build_gpt
from lm.model.layers import CausalSelfAttention
from lm.modules import LanguageModel
from lm.modules.language_model import IGNORE_INDEX


class ScaledAttention(CausalSelfAttention):
    calls = 0  # forward passes through any instance (a test hook, not something a model needs)

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.head_scale = nn.Parameter(torch.ones(self.num_heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        type(self).calls += 1
        return super().attend(q * self.head_scale.view(1, -1, 1, 1).to(q.dtype), k, v, mask)


class ScaledAttentionModel(LanguageModel):
    """`LanguageModel` with `ScaledAttention` and label smoothing.

    Args:
        label_smoothing: Label smoothing of the training loss (0: plain cross-entropy).
    """

    loss_calls = 0

    def __init__(self, *args, label_smoothing: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # saves label_smoothing with the other hyper-parameters too
        self.label_smoothing = label_smoothing

    def build_model(self, config: GPTConfig) -> nn.Module:
        return build_gpt(config, attention_class=ScaledAttention)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        type(self).loss_calls += 1
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)
