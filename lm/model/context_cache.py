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
its validation loss), so it would learn it needs no cache and no softening. They are fitted on the
held-out validation text instead, each time `lm fit` validates (lm/callbacks/context_cache_calibration.py):
every batch's NLL is summed over a grid of (sharpness, weight, temperature), and the best point is kept.
They are buffers, saved in every checkpoint. Until fitted, weight 0 and temperature 1: the plain softmax.

An extension, not part of the network: `GPT` and `KVCache` know nothing of it. A recipe opts in with
`config.context_cache: true`; `build_gpt` then makes a `GPTWithContextCache`, whose forward is the plain
GPT's unless asked for the mixture (`context_cache=True`), and whose KV cache (`ContextKVCache`) also keeps
the hidden states and ids it copies from. Training, `val/loss` and `test/loss` are the plain network's; the
mixture's figures are `val/cache_*` and `test/cache_*`; `lm eval` reports both; generation samples the
plain softmax unless `SamplingOptions.context_cache`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.errors import LMError
from lm.evaluation.token_losses import target_log_probs_by_temperature
from lm.model.config import GPTConfig
from lm.model.gpt import GPT
from lm.model.layers import KVCache


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
    SHARPNESS_BEFORE_CALIBRATION = 8.0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sharpness", torch.tensor(self.SHARPNESS_BEFORE_CALIBRATION))
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

    @staticmethod
    def copy_at_targets(attention: Tensor, next_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) each: the copy probability of each target (the attention on the keys that were followed by it)
        and the attention's total (`mix`'s `history`), without a (B, T, vocab) copy distribution."""
        hits = next_ids.unsqueeze(1) == targets.unsqueeze(-1)  # (B, T, keys): key i was followed by the target
        return (attention * hits).sum(-1), attention.sum(-1)

    @torch.no_grad()
    def target_nll(self, log_probs: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor,
                   targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Summed NLL (float64) of `targets` (B, T) under the mixture `forward` returns, at the targets only.

        `log_probs`: the network's log-probabilities at the targets at the cache's temperature, (B, T) float32:
        `target_log_probs_by_temperature(logits, targets, [cache.temperature])[0]` (`lm eval` makes them in the
        same read as the plain softmax's). The copy probability of a target is the attention on keys followed by
        it, so no (B, T, vocab) copy distribution is built (`lm eval`'s cache row at about the network's cost)."""
        with _float32(log_probs.device):
            scored = targets != ignore_index
            if keys.shape[1] == 0:  # a single position: nothing to copy from
                return -(log_probs * scored).sum(dtype=torch.float64)
            copy, history = self.copy_at_targets(self.copy_weights(hidden, keys, key_mask, self.sharpness.float()),
                                                 next_ids, targets)
            mixed = self.mix(log_probs, copy, self.weight.float(), history)
            return -(mixed * scored).sum(dtype=torch.float64)

    # ------------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def grid_nll(self, logits: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor,
                 targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Summed NLL (float64, shape `grid_shape()`) of `targets` (B, T) at every grid point, for plain
        `logits` (B, T, V) and the arguments `forward` takes (`cache_inputs` makes them)."""
        with _float32(logits.device):
            return self._grid_nll(logits, hidden, keys, next_ids, key_mask, targets, ignore_index)

    def _grid_nll(self, logits: Tensor, hidden: Tensor, keys: Tensor, next_ids: Tensor, key_mask: Tensor,
                  targets: Tensor, ignore_index: int) -> Tensor:
        scored = targets != ignore_index
        safe_targets = targets.clamp(min=0)
        log_probs = target_log_probs_by_temperature(logits, safe_targets, self.TEMPERATURE)  # (temps, B, T)
        result = torch.zeros(self.grid_shape(), dtype=torch.float64, device=logits.device)
        for s, sharpness in enumerate(self.SHARPNESS):
            copy, history = self.copy_at_targets(self.copy_weights(hidden, keys, key_mask, sharpness), next_ids, targets)
            for w, weight in enumerate(self.WEIGHT):
                mixed = self.mix(log_probs, copy, torch.tensor(weight, device=copy.device), history)
                result[s, w] = -(mixed * scored).sum(dim=(1, 2), dtype=torch.float64)
        return result


# ------------------------------------------------------------------------------ the extension
def cache_inputs(hidden: Tensor, input_ids: Tensor, past: int = 0, history: Optional[tuple[Tensor, Tensor]] = None,
                 attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(keys, next_ids, key_mask) of the context cache for positions past..past+T (see ContextCache.forward).
    Key i (an earlier position) offers the token that followed it, i + 1; query t may use keys i < t.
    `history`: the hidden states and ids of every position so far, from a `ContextKVCache` (generation
    then sees the same distribution as `lm eval`); without it, those of `hidden` and `input_ids`."""
    B, T = input_ids.shape
    hidden_all, ids_all = history if history is not None else (hidden, input_ids)
    total = past + T
    keys, next_ids = hidden_all[:, :total - 1], ids_all[:, 1:total]
    query_positions = torch.arange(past, total, device=input_ids.device)
    key_mask = torch.arange(total - 1, device=input_ids.device)[None, :] < query_positions[:, None]  # (T, total-1)
    key_mask = key_mask.expand(B, T, total - 1)
    if attention_mask is not None:  # a key and the token after it must both be real
        real = attention_mask[:, :total].bool()
        key_mask = key_mask & (real[:, :-1] & real[:, 1:])[:, None, :]
    return keys, next_ids, key_mask


class ContextKVCache(KVCache):
    """A KV cache that also keeps every position's final hidden state and token id: the history the
    context cache copies from while decoding."""

    def __init__(self, config: GPTConfig, batch_size: int, max_length: Optional[int] = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(config, batch_size, max_length, device=device, dtype=dtype)
        self.hidden = torch.zeros(batch_size, self.max_length, config.hidden_size, device=device, dtype=dtype)
        self.ids = torch.zeros(batch_size, self.max_length, dtype=torch.long, device=device)

    def per_position(self) -> list[tuple[Tensor, int]]:
        return super().per_position() + [(self.hidden, 1), (self.ids, 1)]

    def narrow(self, rows: slice, start: int, length: Optional[int] = None) -> "ContextKVCache":
        view = super().narrow(rows, start, length)
        view.hidden, view.ids = self.hidden[rows, start:], self.ids[rows, start:]
        return view

    def write_history(self, start: int, hidden: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Store the hidden states (B, T, D) and ids (B, T) of positions start..; return those of every
        position so far."""
        end = start + ids.shape[1]
        self.hidden[:, start:end] = hidden
        self.ids[:, start:end] = ids
        return self.hidden[:, :end], self.ids[:, :end]


class GPTWithContextCache(GPT):
    """`GPT` plus a `ContextCache`: the plain network's forward, and its mixture when asked for.

    The state dict is the GPT's plus `context_cache.{sharpness,weight,temperature}`."""

    accepts_context_cache = True

    def __init__(self, config: GPTConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.context_cache = ContextCache()

    def forward(self, input_ids: Tensor, kv_cache: Optional[KVCache] = None, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, return_hidden: bool = False,
                context_cache: bool = False) -> Tensor:
        """`GPT.forward`; `context_cache=True` (outside training): the log of the cache's mixture instead of
        the logits (a softmax of it gives the mixture, so it is used as logits everywhere)."""
        past = kv_cache.length if kv_cache is not None else 0
        hidden = super().forward(input_ids, kv_cache, position_ids, attention_mask, return_hidden=True)
        if return_hidden:
            return hidden
        logits = self.head(hidden)
        if not context_cache or self.training:
            if isinstance(kv_cache, ContextKVCache):  # keep the history whole for a later mixture step
                kv_cache.write_history(past, hidden, input_ids)
            return logits
        history = None
        if kv_cache is not None:
            if not isinstance(kv_cache, ContextKVCache):
                raise LMError("This KV cache holds no history for the context cache: make it with "
                              "new_kv_cache(..., context_cache=True), or pass context_cache=False.")
            history = kv_cache.write_history(past, hidden, input_ids)
        return self.context_cache(logits, hidden, *cache_inputs(hidden, input_ids, past, history, attention_mask))

    def new_kv_cache(self, batch_size: int, max_length: Optional[int] = None, context_cache: bool = False) -> KVCache:
        """An empty KV cache; `context_cache=True`: one that keeps the history the mixture copies from."""
        if not context_cache:
            return super().new_kv_cache(batch_size, max_length)
        weight = self.embed_tokens.weight
        return ContextKVCache(self.config, batch_size, max_length, device=weight.device, dtype=weight.dtype)

    def without_context_cache(self) -> GPT:
        """The plain network (a `GPT`, `config.context_cache` off) with these weights: what an export to a
        format with no context cache carries."""
        plain = copy.deepcopy(self)
        del plain.context_cache
        plain.__class__ = GPT  # the same modules and buffers, less the cache: exactly a GPT's layout
        plain.config = dataclasses.replace(self.config, context_cache=False)
        return plain


def build_gpt(config: GPTConfig, *args, **kwargs) -> GPT:
    """The network `config` describes: a `GPT`, or a `GPTWithContextCache` when `config.context_cache` is set.
    Extra arguments go to the constructor (`block_class`, `attention_class`)."""
    return (GPTWithContextCache if config.context_cache else GPT)(config, *args, **kwargs)
