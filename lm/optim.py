"""Optimizer parameter groups and the learning-rate schedule, in one place.

Weight decay is a pull towards zero that makes sense for the matrices of linear layers; applied to
norm gains, biases or embedding tables it only hurts (it shrinks the norm scale and rare tokens'
vectors), so those go in a group without decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for nn.Linear weights, none for norms, biases and embeddings.

    A tied LM head shares its weight with the token embedding; it is treated as an embedding (no decay).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embedding_ids
    decay, no_decay = [], []
    for param in model.parameters():  # .parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        (decay if id(param) in linear_ids else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`. `fused=None` picks the fused kernel where torch has one for
    the parameters' device (CUDA, and CPU in recent torch), which is faster than the per-tensor loop."""
    if fused is None:
        fused = _fused_available(model)
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps,
                             fused=fused or None)


def _fused_available(model: nn.Module) -> bool:
    device = next(model.parameters()).device.type
    return device in ("cuda", "cpu", "xpu", "mps")
