"""The token-level losses every metric, loss and score here is made of, in plain torch (no torchmetrics, no
Lightning: `lm eval` and `lm generate` import this and start faster without them).

- `token_nll`: summed cross-entropy of (B, T, V) logits and the number of scored targets (training, validation, test);
- `SummedCrossEntropy`: its CPU training path, a block of rows at a time;
- `target_log_probs_by_temperature`: log-probabilities at the targets only, in chunks, at one or several
  temperatures (scoring: `lm eval`, the context cache and its calibration).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


class SoftTargetCrossEntropy(torch.autograd.Function):
    """sum_n sum_k weights[n, k] * -log softmax(logits[n])[ids[n, k]]: the cross-entropy of logits (N, V) against
    sparse soft targets, K (id, weight) pairs per row (weight 0 where a pair is unused), in float32, `ROWS` rows at a
    time like `SummedCrossEntropy` (no float32 copy of the whole logits, none kept for the backward pass). With the
    one-hot target as pair 0 it is a weighted cross-entropy plus whatever else the targets spread their mass on."""

    ROWS = SummedCrossEntropy.ROWS

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        for block, block_ids, block_weights in zip(*(t.split(SoftTargetCrossEntropy.ROWS) for t in (logits, ids, weights))):
            block = block.float()
            log_z = torch.logsumexp(block, dim=-1, keepdim=True)
            loss += (block_weights * (log_z - block.gather(1, block_ids))).sum()
        ctx.save_for_backward(logits, ids, weights)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        logits, ids, weights = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        weights = weights * grad_loss  # d loss / d logit row = softmax * sum(weights) - the weights at their ids
        for start in range(0, logits.shape[0], SoftTargetCrossEntropy.ROWS):
            rows = slice(start, start + SoftTargetCrossEntropy.ROWS)
            grad = torch.softmax(logits[rows].float(), dim=-1).mul_(weights[rows].sum(1, keepdim=True))
            grad_logits[rows] = grad.scatter_add_(1, ids[rows], -weights[rows])
        return grad_logits, None, None


def target_log_probs_by_temperature(logits: Tensor, targets: Tensor, temperatures: Sequence[float | Tensor],
                                    rows: int = 128) -> Tensor:
    """(len(temperatures), B, T) float32: log softmax(logits / t) at `targets` (B, T; valid ids) for each
    temperature t, of `logits` (B, T, V).

    A chunk of `rows` positions at a time: each chunk is cast to float32 once and read at every temperature while
    the CPU's cache still holds it, where a pass over the whole (B x T x vocab) logits per temperature would
    stream them from memory each time (`lm eval` of a model with a context cache scores two temperatures, the
    cache's calibration seven, `calibrate_temperature` eleven). `lm eval` also makes the logits a window at a time
    from bf16 hidden states (`lm.evaluation.perplexity._target_log_probs`); in float32 that cost ~30%, where large
    products run faster."""
    result = torch.empty((len(temperatures), targets.numel()), dtype=torch.float32, device=targets.device)
    start = 0
    for chunk, chunk_targets in zip(logits.flatten(0, 1).split(rows), targets.flatten().split(rows)):
        scaled, scale = chunk.float(), 1.0  # `scaled` = chunk / scale
        for i, temperature in enumerate(temperatures):
            if not (isinstance(temperature, float) and temperature == scale):
                if scaled.data_ptr() == chunk.data_ptr():  # float32 logits: .float() gave the caller's own
                    scaled = scaled.clone()
                scaled.mul_(scale / temperature)  # in place, from the last temperature's: no new chunk per row
                scale = temperature
            result[i, start:start + len(chunk)] = -F.cross_entropy(scaled, chunk_targets, reduction="none")
        start += len(chunk)
    return result.view(len(temperatures), *targets.shape)
