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
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

IGNORE_INDEX = -100  # targets with this value (padding, masked prompt tokens) are not scored


def token_nll(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood (nats) of `targets` (B, T) under `logits` (B, T, V), and the number
    of scored targets. The plain cross-entropy every metric here is made of, whatever a model trains on.

    Logits are upcast to float32 for the log-softmax: under bf16 autocast an 8k-50k way softmax in bf16
    loses the small probabilities the loss is made of. With a gradient on CPU, `SummedCrossEntropy` does it a
    block of rows at a time (the same values, less memory traffic); elsewhere `F.cross_entropy` of the whole (an
    accelerator's bandwidth makes the whole pass cheap, and blocks would cost a kernel launch each)."""
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    if torch.is_grad_enabled() and logits.requires_grad and logits.device.type == "cpu":
        nll = SummedCrossEntropy.apply(flat_logits, flat_targets)
    else:
        nll = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


class SummedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) against targets (N,) (IGNORE_INDEX not scored), in float32 whatever
    the logits' dtype, `ROWS` rows at a time.

    `F.cross_entropy(logits.float())` makes a float32 copy of the whole logits, keeps its float32 log-softmax for
    the backward pass, and there builds a dense gradient of the log-probabilities, then that of the logits, then
    casts it back: five passes over (N x V) float32 tensors that do not fit in any cache (2,048 x 8,192 = 64 MiB
    per tensor). Here each block's float32 copy lives only while the CPU's cache holds it, the backward pass
    recomputes the block's softmax from the saved logits (in their own dtype: half the memory under bf16
    autocast) and writes softmax - one-hot straight into the logits' gradient. The loss and its backward pass of
    2,048 x 8,192 bf16 logits took 18 ms instead of 26 (as fast in fp32), and the step's peak memory is lower
    (docs/results/memory-levers.md). Values equal `F.cross_entropy`'s to float32 rounding
    (tests/test_cpu_training_paths.py)."""

    ROWS = 64  # 64 x 8,192 float32 = 2 MiB: a block stays in a core's L2/L3 while it is read twice

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        nll = logits.new_zeros((), dtype=torch.float32)
        for block, block_targets in zip(logits.split(SummedCrossEntropy.ROWS), targets.split(SummedCrossEntropy.ROWS)):
            nll += F.cross_entropy(block.float(), block_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(logits, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor) -> tuple[Tensor, None]:
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scored = (targets != IGNORE_INDEX).to(torch.float32) * grad_nll  # d nll / d logit row = softmax - one-hot
        for start in range(0, logits.shape[0], SummedCrossEntropy.ROWS):
            rows = slice(start, start + SummedCrossEntropy.ROWS)
            grad = torch.softmax(logits[rows].float(), dim=-1).mul_(scored[rows, None])
            block_targets = targets[rows]
            hit = (block_targets != IGNORE_INDEX).nonzero().squeeze(1)
            grad[hit, block_targets[hit]] -= scored[rows][hit]
            grad_logits[rows] = grad
        return grad_logits, None


def target_log_probs(logits: Tensor, targets: Tensor, temperature: float | Tensor = 1.0, rows: int = 128) -> Tensor:
    """log softmax(logits / temperature) at `targets` (B, T; valid ids), float32, a chunk of `rows` positions at
    a time: each chunk's float32 copy is still in the CPU's cache when the log-softmax reads it (about twice
    as fast as one pass over a (B x T x vocab) tensor in scoring, where nothing needs a gradient)."""
    parts = []
    for chunk, chunk_targets in zip(logits.flatten(0, 1).split(rows), targets.flatten().split(rows)):
        chunk = chunk.float()
        if not (isinstance(temperature, float) and temperature == 1.0):
            chunk = chunk / temperature
        parts.append(-F.cross_entropy(chunk, chunk_targets, reduction="none"))
    return torch.cat(parts).view_as(targets)


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
