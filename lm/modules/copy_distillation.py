"""Copy distillation: the network trained toward its own context cache's copy distribution as a soft target.

The context cache (lm/model/context_cache.py) mixes into the softmax the tokens that followed earlier positions of
the window whose final hidden states resemble the current one, and takes ~9% off the test bpb of the default
recipe. But it is a scoring device: the network itself, what generates, exports and fine-tunes, copies from its
context poorly (a model that fits 250k training tokens over ten epochs predicts them from memory and has no
reason to look back). `LanguageModel(copy_distillation=w)` makes the copy part of the training target:

    loss = (1 - w) * CE(softmax, next token) + w * CE(softmax, copy distribution)

where the copy distribution is the cache's (`ContextCache.copy_weights` over the window's earlier positions, at the
cache's calibrated sharpness) built from the detached hidden states, so no gradient flows through the teacher: the
network learns to put on its own the probability the cache would add. Positions with no history (the first of a
window) keep the plain target. Every verb after training sees an ordinary network (no new weights); training
costs one (T x T) similarity per window and the pairs' gathers, fused into the blocked cross-entropy
(`SoftTargetCrossEntropy`: no float32 copy of the whole logits). Measured in docs/results/quality.md ("Copy
distillation").
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm.evaluation.token_losses import IGNORE_INDEX, SoftTargetCrossEntropy
from lm.model.context_cache import ContextCache


def copy_distillation_loss(logits: Tensor, hidden: Tensor, targets: Tensor, sharpness: float, weight: float) -> Tensor:
    """(1 - `weight`) x the mean cross-entropy of `targets` (B, T) under `logits` (B, T, V) + `weight` x the mean
    cross-entropy of the copy distribution over the positions that have one. `hidden`: the final-norm hidden
    states (B, T, D) the copy attention compares (detached here)."""
    B, T, _ = logits.shape
    offered = targets[:, :-1]  # key i offers the token that followed position i
    key_mask = torch.arange(T - 1, device=targets.device)[None, :] < torch.arange(T, device=targets.device)[:, None]
    key_mask = key_mask[None] & (offered != IGNORE_INDEX)[:, None, :]  # (B, T, T - 1): earlier, real keys
    with torch.autocast(device_type=logits.device.type, enabled=False):
        detached = hidden.detach()
        attention = ContextCache.copy_weights(detached, detached[:, :-1], key_mask, sharpness)  # rows sum to 1 or 0
    scored = targets != IGNORE_INDEX
    copied = scored & key_mask.any(-1)
    hard = (1 - weight) * scored / scored.sum().clamp(min=1)
    soft = weight * attention * (copied / copied.sum().clamp(min=1))[..., None]
    ids = torch.cat([targets.clamp(min=0)[..., None], offered.clamp(min=0)[:, None, :].expand(B, T, T - 1)], -1)
    weights = torch.cat([hard[..., None], soft], -1)
    return SoftTargetCrossEntropy.apply(logits.flatten(0, 1), ids.flatten(0, 1), weights.flatten(0, 1))
