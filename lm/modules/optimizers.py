"""Optimizer parameter groups and the learning-rate schedule, in one place.

Weight decay is a pull towards zero that makes sense for the matrices of linear layers; applied to
norm gains, biases or embedding tables it only hurts (it shrinks the norm scale and rare tokens'
vectors), so those go in a group without decay.

`build_optimizer(..., optimizer="muon")` gives the hidden matrices to Muon (torch.optim.Muon, with its
Newton-Schulz iterations in fp32 on CPUs without native bf16: see `Muon`) and the rest to AdamW, in one
optimizer object that Lightning, the LR scheduler and checkpoints treat as one. Two variants of Muon's
update from the speedrun literature: `"normuon"` (each output row's step evened out, `normalize_rows`) and
`"muon_polar_express"` (Polar Express's orthogonalization, `POLAR_EXPRESS_COEFFICIENTS`). Neither beat plain
Muon in the default recipe (docs/results/quality.md, "Round 2"); they are there for runs where they were found
to pay.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from lm.model import inference
from lm.runtime import hardware


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay for nn.Linear weights, none for norms, biases and embeddings.

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


Schedule = Literal["cosine", "wsd"]


def lr_multiplier(step: int, progress: float, warmup_steps: int, min_lr_ratio: float,
                  schedule: Schedule = "cosine", cooldown_fraction: float = 0.2) -> float:
    """LR multiplier at optimizer `step`, `progress` (0 -> 1) of the way through the run's budget.

    - a linear warm-up over the first `warmup_steps` steps (from ~0 to 1), then
    - `cosine`: a half cosine from 1 down to `min_lr_ratio` at progress 1;
    - `wsd` (warmup-stable-decay): 1 until `1 - cooldown_fraction`, then a linear cooldown to
      `min_lr_ratio`. The cooldown at the end is what anneals the model; a long stable phase lets the
      run use its whole budget at the peak LR, and a time-bounded run decays exactly when time runs out.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "wsd":
        start = 1.0 - cooldown_fraction
        if progress <= start:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * (progress - start) / max(cooldown_fraction, 1e-9)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_progress(step: int, warmup_steps: int, max_steps: int) -> float:
    """How far the decay phase of a step-bounded run is: 0 at the end of warm-up, 1 at `max_steps`."""
    return (step - warmup_steps) / max(1, max_steps - warmup_steps)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    return lr_multiplier(step, step_progress(step, warmup_steps, max_steps), warmup_steps, min_lr_ratio)


OptimizerName = Literal["adamw", "muon", "normuon", "muon_polar_express"]
MUON_OPTIMIZERS = ("muon", "normuon", "muon_polar_express")  # the names that give hidden matrices to `Muon`


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, fused: bool | None = None,
                    optimizer: OptimizerName = "adamw", adamw_lr_ratio: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`, or `MuonWithAdamW` for `optimizer="muon"` (or a variant), its AdamW
    groups at `adamw_lr_ratio` times `learning_rate`. `fused=None` picks the fused AdamW kernel where torch
    has one for the parameters' device (CUDA, and CPU in recent torch), which is faster than the per-tensor
    loop."""
    if fused is None:
        fused = _fused_available(model)
    decay, no_decay = parameter_groups(model, weight_decay)
    if optimizer in MUON_OPTIMIZERS:
        head = getattr(model, "lm_head", None)
        is_hidden = [p.dim() == 2 and (head is None or p is not head.weight) for p in decay["params"]]
        hidden = [p for p, h in zip(decay["params"], is_hidden) if h]
        rest = [p for p, h in zip(decay["params"], is_hidden) if not h]
        muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                    row_normalization_beta2=NORMUON_BETA2 if optimizer == "normuon" else None,
                    polar_express=optimizer == "muon_polar_express")
        adamw = torch.optim.AdamW([{**decay, "params": rest}, no_decay], lr=learning_rate * adamw_lr_ratio,
                                  betas=betas, eps=eps, fused=fused or None)
        return MuonWithAdamW(muon, adamw)
    return torch.optim.AdamW([decay, no_decay], lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matrix products are fast on `device`: CUDA and other accelerators yes; a CPU only with
    native bf16 (AVX-512-BF16, AMX) that oneDNN uses (not capped by `ONEDNN_MAX_CPU_ISA`), elsewhere torch
    falls back to a reference kernel."""
    # Looked up on the modules at each call, so a probe can be replaced (tests stand in an AVX2-only CPU).
    return device.type != "cpu" or (hardware.cpu_has_native_bf16() and inference.onednn_bf16_supported())


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` whose Newton-Schulz iterations run in fp32 where bf16 matrix products are slow.

    torch runs them in bf16, right on GPUs and on CPUs with native bf16. On a CPU without it (AVX2) a
    bf16 product takes torch's reference kernel, some hundred times slower than fp32, and Muon's iteration
    is nothing but such products: a step would cost more than the forward and backward passes it follows
    (benchmarks/muon_step.py; figures in docs/results/figures.md). There, `step` runs the same update as
    torch's (momentum, Nesterov, the quintic iteration, the LR adjustment, decoupled weight decay) with the
    iteration in fp32 (on the Gram matrix for non-square matrices: `newton_schulz`); state dicts are torch's.
    `newton_schulz_dtype` forces a dtype (None: bf16 where fast, else fp32). `row_normalization_beta2` (NorMuon)
    and `polar_express` change the update; either one takes this class's own step in both dtypes.
    """

    def __init__(self, params, *, newton_schulz_dtype: torch.dtype | None = None,
                 row_normalization_beta2: float | None = None, polar_express: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype
        self.row_normalization_beta2 = row_normalization_beta2
        self.polar_express = polar_express

    def iteration_dtype(self) -> torch.dtype:
        """The dtype `step` runs the Newton-Schulz iteration in: `newton_schulz_dtype`, or bf16 where it is fast."""
        if self.newton_schulz_dtype is not None:
            return self.newton_schulz_dtype
        devices = {p.device for group in self.param_groups for p in group["params"]}
        return torch.bfloat16 if all(fast_bf16_matmul(d) for d in devices) else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        dtype = self.iteration_dtype()
        if dtype == torch.bfloat16 and self.row_normalization_beta2 is None and not self.polar_express:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group, dtype)
        return loss

    def _step_group(self, group: dict, dtype: torch.dtype) -> None:
        """torch's single-tensor Muon update of one param group, with the iteration in `dtype`."""
        momentum, lr = group["momentum"], group["lr"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1 - momentum)
            update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            if self.polar_express:
                update = newton_schulz(update, POLAR_EXPRESS_COEFFICIENTS, group["eps"], dtype,
                                       POLAR_EXPRESS_NORM_MARGIN)
            else:
                update = newton_schulz(update, [group["ns_coefficients"]] * group["ns_steps"], group["eps"], dtype)
            if self.row_normalization_beta2 is not None:
                update = normalize_rows(update, state, self.row_normalization_beta2)
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update, alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], param.shape))


def newton_schulz(matrix: torch.Tensor, coefficients: Sequence[tuple[float, float, float]], eps: float,
                  dtype: torch.dtype, norm_margin: float = 1.0) -> torch.Tensor:
    """The approximate orthogonalization of torch's Muon (quintic Newton-Schulz; the plain form runs torch's
    operations in the same order), computed in `dtype`. `coefficients`: one (a, b, c) per iteration (torch's one triple
    repeated `ns_steps` times, or Polar Express's `POLAR_EXPRESS_COEFFICIENTS` with its `norm_margin` of 1.02).
    The matrix is first divided by `norm_margin` times its Frobenius norm.

    In float32 (or float64), for a matrix at least twice as long as it is wide and at most
    `GRAM_ITERATION_MAX_STEPS` iterations, the same polynomial is computed on the Gram matrix
    (`gram_iteration`): 34-44% fewer FLOPs at the default recipe's shapes."""
    x = matrix.to(dtype, copy=True)  # never the caller's tensor (the momentum buffer without Nesterov)
    tall = matrix.size(0) > matrix.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x.div_((x.norm() * norm_margin).clamp(min=eps))  # spectral norm <= 1
    if uses_gram_iteration(tuple(x.shape), len(coefficients), dtype):
        x = gram_iteration(x, coefficients)
    else:
        for a, b, c in coefficients:
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


# Beyond 5 iterations the Gram form's float32 rounding grows fast (relative error of the result against float64, a
# 1,024 x 256 matrix with singular values from 1 to 1e-4: 9e-5 at 5 iterations, 8e-4 at 6, 6e-2 at 8).
GRAM_ITERATION_MAX_STEPS = 5


def uses_gram_iteration(shape: tuple[int, ...], steps: int, dtype: torch.dtype) -> bool:
    """Whether `newton_schulz` iterates on the Gram matrix: float32/float64, at most `GRAM_ITERATION_MAX_STEPS`
    iterations, and the long side at least twice the short one (where it saves FLOPs: `newton_schulz_flops`). In
    bf16 the Gram form loses the small singular values (relative error ~1 against ~0.09 for the plain form)."""
    short, long = sorted(shape[:2])
    return dtype in (torch.float32, torch.float64) and 1 <= steps <= GRAM_ITERATION_MAX_STEPS and long >= 2 * short


def gram_iteration(x: torch.Tensor, coefficients: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """The quintic iterations x <- p(x x^T) x, p(A) = aI + bA + cA^2, of a wide x (a x b, a <= b) carried out on the
    a x a Gram matrix A = x x^T: since each p(A_k) is symmetric and commutes with A_k, the next Gram matrix is
    p(A_k) A_k p(A_k) and the result is p(A_K-1) ... p(A_0) x. Two products with x (A_0 and the last one) instead
    of two per iteration: 4a^2 b + 34a^3 FLOPs for 5 iterations against 20a^2 b + 10a^3. Equal to the plain
    iteration in exact arithmetic; in float32 within ~1e-4 of its float64 result (tests/test_metrics_optim.py),
    where bf16's plain iteration, torch's default, is within ~0.1."""
    gram, product = x @ x.T, None
    for step, (a, b, c) in enumerate(coefficients):
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        polynomial.diagonal().add_(a)
        product = polynomial if product is None else polynomial @ product
        if step < len(coefficients) - 1:
            gram = polynomial @ gram @ polynomial
    return product @ x


# Polar Express (Amsel et al. 2025, arXiv:2505.16932): one quintic per iteration, each the minimax-optimal one
# for where the singular values can be by then (5 iterations, safety factor 2e-2, cushion 2: the paper's
# numbers). The norm is inflated by 2% first, the safety margin they were derived for.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_MARGIN = 1.02

NORMUON_BETA2 = 0.95  # the NorMuon paper's second-moment decay


def normalize_rows(update: torch.Tensor, state: dict, beta2: float, eps: float = 1e-10) -> torch.Tensor:
    """NorMuon (Li et al. 2025): divide each row (output neuron) of an orthogonalized update by the root of
    a moving average of its mean square, then rescale the whole update back to its Frobenius norm, so the
    LR adjustment that matches AdamW's RMS still holds. Orthogonalization equalizes the update's singular
    values, not its rows; this evens out the per-neuron step sizes as Adam does per coordinate."""
    update = update.float()
    if "row_second_moment" not in state:
        state["row_second_moment"] = torch.zeros(update.shape[0], 1, device=update.device)
    moment = state["row_second_moment"]
    moment.lerp_(update.square().mean(dim=1, keepdim=True), 1 - beta2)
    norm = update.norm()
    update = update * moment.clamp(min=eps).rsqrt()
    return update * (norm / update.norm().clamp(min=eps))


def newton_schulz_flops(shape: tuple[int, ...], steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> int:
    """FLOPs of `newton_schulz` on a (rows, columns) matrix in `dtype`, a = its smaller side, b = the larger: per
    iteration the Gram matrix (2a^2 b), its square (2a^3) and the product with the matrix (2a^2 b); on the Gram
    matrix (`gram_iteration`) the first Gram matrix and the last product (4a^2 b), each iteration's square (2a^3),
    the running product of the polynomials (2a^3, from the second) and the next Gram matrix (4a^3, all but the last)."""
    a, b = sorted(shape[:2])
    if uses_gram_iteration(tuple(shape), steps, dtype):
        return 4 * a * a * b + (8 * steps - 6) * a ** 3
    return steps * (4 * a * a * b + 2 * a ** 3)


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon learning-rate adjustment for a (rows, columns) matrix."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / columns))
    if adjust_lr_fn == "match_rms_adamw":  # Moonlight: updates of AdamW's RMS
        return 0.2 * math.sqrt(max(rows, columns))
    return 1.0


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden layers' weight matrices, AdamW for embeddings, the LM head, norms and biases.

    Muon (Jordan et al. 2024) replaces each matrix's momentum update by its nearest orthogonal matrix
    (Newton-Schulz iterations), which only makes sense for a matrix mapping features to features; with
    `adjust_lr_fn="match_rms_adamw"` (Moonlight, Liu et al. 2025) its updates have AdamW's size, so one
    learning rate and weight decay serve both. The two optimizers' param groups *are* this optimizer's
    groups (the same dicts), so an LR scheduler, gradient clipping and zero_grad reach both; the state
    dict holds both states.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self.param_groups = [*muon.param_groups, *adamw.param_groups]  # the inner dicts themselves

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


def _fused_available(model: nn.Module) -> bool:
    device = next(model.parameters()).device.type
    return device in ("cuda", "cpu", "xpu", "mps")
