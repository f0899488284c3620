"""Token-weighted language-modelling metrics that stay correct across batches and ranks.

Averaging per-batch perplexities is wrong when batches hold different numbers of tokens (the last
evaluation batch usually does) and when ranks see different amounts of data. So we keep three sums —
negative log-likelihood in nats, number of target tokens and number of UTF-8 bytes those tokens
stand for — reduce them with a sum across processes (torchmetrics does the DDP sync), and only then
divide:

    loss = nll / tokens,   perplexity = exp(loss),   bits-per-byte = nll / (ln 2 * bytes)

Bits-per-byte does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class LanguageModelingMetrics(Metric):
    full_state_update = False
    higher_is_better = False

    def __init__(self, grid_shape: tuple[int, ...] = (), **kwargs) -> None:
        """`grid_shape`: sum the NLL of a grid of model settings at once (each update passes that shape;
        the context cache's calibration, lm/callbacks/context_cache_calibration.py); `compute` reports the best point."""
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.zeros(grid_shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, num_tokens: Tensor | int, num_bytes: Tensor | int = 0) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.num_tokens += torch.as_tensor(num_tokens, device=self.num_tokens.device)
        self.num_bytes += torch.as_tensor(num_bytes, device=self.num_bytes.device)

    def compute(self) -> dict[str, Tensor]:
        nll, result = self.nll_sum, {}
        if nll.dim():  # a grid: the best point's figures, and its flat index (the first of equals)
            result["index"] = index = torch.argmin(nll.flatten())
            nll = nll.flatten()[index]
        loss = nll / self.num_tokens.clamp(min=1)
        result.update(loss=loss.float(), ppl=torch.exp(loss).float())
        if self.num_bytes > 0:
            result["bpb"] = (nll / (math.log(2) * self.num_bytes)).float()
        return result
