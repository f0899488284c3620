"""`ContextCache`: a copy distribution over the model's own window, mixed into its softmax.

A neural cache (Grave et al. 2017, "Improving Neural Language Models with a Continuous Cache"), kept
inside the context the model is given: nothing is remembered across windows or documents. Words repeat
within a text (a name, a place, a term of the article at hand), and a small model trained on a small
corpus learns to copy them from its context slowly. The cache does it directly: the token that followed
an earlier position whose final hidden state resembles the current one is likely to come next.

    p(w | x_1..x_t) = (1 - weight) * softmax(logits_t / temperature)_w
                      + weight * sum_{i < t, x_{i+1} = w} softmax_i(sharpness * cos(h_t, h_i))

`h` are the final-norm hidden states (the LM head's input). The first position has no history: there
the model predicts with its softmax alone.

The three scalars are calibration, not weights. They are not trained by gradient descent on the
training text: a model that fits its training text is confident there (its training loss sits far below
its validation loss), so it would learn it needs no cache and no softening. `LanguageModel` fits them on
the held-out validation text instead, each time it validates: every batch's NLL is summed over a grid of
(sharpness, weight, temperature), and the best point is kept, the way the best checkpoint is kept. They
are buffers, saved in every checkpoint. Until fitted, weight 0 and temperature 1: the plain softmax.
The cache is used in evaluation only (`GPT.forward` outside training), so training is unchanged; `lm eval`,
`lm test`, generation (the KV cache keeps the hidden states it copies from) and `lm serve` read the same
mixture. `lm validate` fits it again on the data it is given; the fine-tuning modules keep the backbone's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the mixture is log-space arithmetic on probabilities, and under bf16 autocast the
    copy attention (an einsum) would come out bf16 beside float32 log-probabilities (scatter refuses
    mixed dtypes, and bf16 would round the small copy probabilities away). Everything here is float32."""
    return torch.autocast(device_type=device.type, enabled=False)


class ContextCache(nn.Module):
    """The cache's three calibrated scalars and the mixture they define. Subclass to change the grid."""

    # The calibration grid: cosine-similarity sharpness, mixture weight, softmax temperature.
    SHARPNESS = (4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
    WEIGHT = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
    TEMPERATURE = (0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)  # each costs a log-softmax over the vocabulary

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sharpness", torch.tensor(8.0))
        self.register_buffer("weight", torch.tensor(0.0))
        self.register_buffer("temperature", torch.tensor(1.0))

    def grid_shape(self) -> tuple[int, int, int]:
        return len(self.SHARPNESS), len(self.WEIGHT), len(self.TEMPERATURE)

    def set_from_grid(self, index: int | Tensor) -> tuple[float, float, float]:
        """Keep the grid point with flat `index` (into `grid_shape()`); return (sharpness, weight, temperature)."""
        s, w, t = torch.unravel_index(torch.as_tensor(index).cpu(), self.grid_shape())
        values = self.SHARPNESS[int(s)], self.WEIGHT[int(w)], self.TEMPERATURE[int(t)]
        for buffer, value in zip((self.sharpness, self.weight, self.temperature), values):
            buffer.fill_(value)
        return values

    # ----------------------------------------------------------------------------------- mixture
    @staticmethod
    def copy_weights(hidden: Tensor, keys: Tensor, key_mask: Tensor, sharpness: float | Tensor) -> Tensor:
        """(B, Tq, Tk) attention of each query position over the earlier positions it may copy from
        (`key_mask`, bool, True where allowed); rows with no allowed key are all zero."""
        scores = sharpness * torch.einsum("bqd,bkd->bqk", F.normalize(hidden.float(), dim=-1),
                                          F.normalize(keys.float(), dim=-1))
        scores = scores.masked_fill(~key_mask, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all -inf row (no history) -> zeros

    def forward(self, logits: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor) -> Tensor:
        """Log-probabilities (B, Tq, V) of the mixture: usable as logits (softmax of them is the mixture).

        Args:
            logits: the LM head's (B, Tq, V) for the query positions.
            hidden: their final hidden states (B, Tq, D).
            keys: hidden states of the positions that can be copied from (B, Tk, D)...
            next_ids: ...and the token that followed each of them (B, Tk).
            key_mask: (B, Tq, Tk) bool: which keys each query may use (earlier positions, not padding).
        """
        with _float32(logits.device):
            log_probs = torch.log_softmax(logits.float() / self.temperature.float(), dim=-1)
            if keys.shape[1] == 0:  # a single position: nothing to copy from
                return log_probs
            attention = self.copy_weights(hidden, keys, key_mask, self.sharpness.float())
            copy = torch.zeros_like(log_probs).scatter_add_(-1, next_ids.unsqueeze(1).expand_as(attention), attention)
            return self.mix(log_probs, copy, self.weight.float(), attention.sum(dim=-1, keepdim=True))

    @staticmethod
    def mix(log_probs: Tensor, copy: Tensor, weight: Tensor, history: Tensor) -> Tensor:
        """log((1 - weight * history) * p + weight * copy) from log p and the copy probabilities. `history` is
        the copy attention's total: 1 where there are earlier positions, 0 where there are none (position 0:
        the softmax alone). Arithmetic rather than a branch on values, so the graph traces (ONNX); weight 0
        gives log(0) = -inf on the copy side, and logaddexp(a, -inf) = a."""
        return torch.logaddexp(log_probs + torch.log1p(-weight * history), torch.log(copy.clamp_min(1e-30)) + torch.log(weight))

    # ------------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def grid_nll(self, logits: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor,
                 targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Summed NLL (float64, shape `grid_shape()`) of `targets` (B, T) at every grid point, for plain
        `logits` (B, T, V) and the arguments `forward` takes (`GPT.context_cache_inputs` makes them)."""
        with _float32(logits.device):
            return self._grid_nll(logits, hidden, keys, next_ids, key_mask, targets, ignore_index)

    def _grid_nll(self, logits: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor,
                  targets: Tensor, ignore_index: int) -> Tensor:
        scored = targets != ignore_index
        flat_logits, flat_targets = logits.float().flatten(0, 1), targets.clamp(min=0).flatten()
        target_log_probs = torch.stack([  # (temperatures, B, T); cross_entropy: torch's fused log-softmax
            -F.cross_entropy(flat_logits * (1.0 / t), flat_targets, reduction="none").view_as(targets)
            for t in self.TEMPERATURE])
        hits = next_ids.unsqueeze(1) == targets.unsqueeze(-1)  # (B, T, keys): key i was followed by the target
        result = torch.zeros(self.grid_shape(), dtype=torch.float64, device=logits.device)
        for s, sharpness in enumerate(self.SHARPNESS):
            attention = self.copy_weights(hidden, keys, key_mask, sharpness)
            copy, history = (attention * hits).sum(-1), attention.sum(-1)  # (B, T) each
            for w, weight in enumerate(self.WEIGHT):
                mixed = self.mix(target_log_probs, copy, torch.tensor(weight, device=copy.device), history)
                result[s, w] = -(mixed * scored).sum(dim=(1, 2), dtype=torch.float64)
        return result
