"""How the next token is chosen: `SamplingOptions` (the one typed source of sampling settings),
`filter_logits` (top-k / top-p), `sample_next_token` (greedy or sampled) and `sampling_generator` (the
random stream a seed gives). Used by `lm.model.generation` and the `lm serve` batch engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lm.errors import LMError


@dataclass
class SamplingOptions:
    """How to sample: the one typed source of these settings for every caller (`lm.model.generation`,
    `lm generate`, `lm predict`, the `TextSampler` callback, the server). Same defaults, same checks.

    Args:
        max_new_tokens: Most tokens to generate per prompt.
        temperature: 0 is greedy; otherwise the softmax temperature for sampling.
        top_k: Sample only among the k most likely tokens (None: no limit).
        top_p: Nucleus sampling: the smallest set of tokens with probability mass >= top_p (None: off).
        seed: Seed of the sampler's generator, for reproducible samples (None: torch's global RNG).
        stop: Strings that end a completion (cut before the first one); one string or a list. Text
            level only (`generate_text`, `stream_text`, the server).
        truncate: Keep only the last tokens of a prompt too long for the context (else an error).
        context_cache: Sample from the context cache's mixture, for a model that has one
            (`GPTConfig.context_cache`). Off by default: the cache lowers the scored loss but, sampled,
            copies the model's own mistakes back into the text (repeated phrases; measured by
            benchmarks/generation_quality.py). `lm eval`, `lm test` and `lm validate` score it beside the network.
        repetition_penalty: Make tokens of the last `repetition_window` tokens (prompt included) less likely:
            a positive logit is divided by it, a negative one multiplied (CTRL, Keskar et al. 2019; HF's
            `repetition_penalty`, llama.cpp's `repeat_penalty`). 1.0 is off. A small model sampled at
            temperature 0.8 falls into loops that real text does not have; the default keeps its repetition
            near the test text's (benchmarks/generation_quality.py). Sampling only: scores are unchanged.
        repetition_window: How many of the latest tokens the penalty looks at.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = field(default=None)
    truncate: bool = False
    context_cache: bool = False
    repetition_penalty: float = 1.2
    repetition_window: int = 64

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LMError(f"seed must be an integer in [0, 2^63), got {self.seed}: torch's generators take 64-bit seeds.")
        if not self.repetition_penalty >= 1.0:
            raise LMError(f"repetition_penalty must be >= 1 (1 is off), got {self.repetition_penalty}.")
        if self.repetition_window < 1:
            raise LMError(f"repetition_window must be a positive number of tokens, got {self.repetition_window}.")
        if self.max_new_tokens < 0:
            raise LMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LMError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k <= 0:
            raise LMError(f"top_k must be a positive number of tokens (or None), got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LMError(f"top_p must be in (0, 1] (or None), got {self.top_p}.")
        self.stop = ([self.stop] if isinstance(self.stop, str) else list(self.stop)) if self.stop else None

    @classmethod
    def resolve(cls, options: Optional["SamplingOptions"] = None, **overrides: Any) -> "SamplingOptions":
        """`options` (default: `SamplingOptions()`) with some fields replaced, e.g. `temperature=0`."""
        if isinstance(options, dict):  # e.g. read back from a checkpoint's plain hyper-parameters
            options = cls(**options)
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"Unknown sampling options {unknown}; valid: {[f.name for f in fields(cls)]}.")
        return replace(options or cls(), **overrides)

    def for_batch(self, index: int) -> "SamplingOptions":
        """The options of the `index`-th batch of a run: its own, still reproducible, seed (`seed + index`)."""
        return self if self.seed is None else replace(self, seed=self.seed + index)


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set the logits of tokens outside the top-k / nucleus (top-p) set to -inf. `logits` is (B, V).

    Top-k keeps the k largest logits (ties with the k-th are kept too). Top-p keeps the smallest set
    of most likely tokens whose probability reaches `top_p`; the most likely token is always kept,
    so even a tiny `top_p` leaves one token (greedy). Both together: top-k first, then top-p on what
    is left (the usual order, as in HF transformers).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token: drop a token once the tokens before it already reach top_p.
        # The first token has 0 before it, so it always survives.
        remove_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        remove_sorted[..., 0] = False  # also when top_p is below float32's range (1e-300 is 0 there: 0 >= 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def penalize_repeats(logits: Tensor, recent: Tensor, penalty: float) -> Tensor:
    """`logits` (B, V) with the tokens in `recent` (B, W; -1 = no token) made less likely: positive logits
    divided by `penalty`, negative ones multiplied (each token once, however often it occurred)."""
    # Only the W recent columns are touched (gather, penalize, scatter back), not all V: a decode step's
    # sampling stays small next to its forward. An empty slot (-1) points at its row's latest token instead,
    # so every write to a column carries that column's one penalized value (repeats write the same value).
    latest = recent[:, -1:]  # right-aligned: -1 here only if the row has no token at all
    index = torch.where(recent >= 0, recent, latest).clamp(min=0)
    values = logits.gather(-1, index)
    penalized = torch.where(values > 0, values / penalty, values * penalty)
    penalized = torch.where(latest >= 0, penalized, values)  # a row without tokens: unchanged
    return logits.scatter(-1, index, penalized)


def recent_tokens(rows: list[list[int]], window: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, window) of each row's last `window` ids, right-aligned, -1 before a short row's first."""
    recent = torch.full((len(rows), window), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        tail = row[-window:]
        if tail:
            recent[i, window - len(tail):] = torch.tensor(tail, dtype=torch.long)
    return recent.to(device)


def with_latest(recent: Tensor, tokens: Tensor) -> Tensor:
    """`recent` (B, W) with each row's new token (`tokens`, B) appended and its oldest one dropped."""
    return torch.cat([recent[:, 1:], tokens.reshape(-1, 1).to(recent)], dim=1)


def sample_next_token(logits: Tensor, options: SamplingOptions, generator: Optional[torch.Generator] = None,
                      recent: Optional[Tensor] = None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V), with `options`' repetition penalty (over the
    `recent` tokens (B, W), see `recent_tokens`), temperature, top-k, top-p.

    `temperature=0` is greedy (argmax; top-k/top-p do not change the argmax). Otherwise the logits are
    divided by the temperature, filtered by `filter_logits` and sampled in float32 (bf16 probabilities
    are too coarse for `multinomial`).
    """
    if recent is not None and options.repetition_penalty != 1.0:
        logits = penalize_repeats(logits.float(), recent, options.repetition_penalty)
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if options.temperature != 1.0:
        # Shifted so the largest logit is 0 (softmax and the filters do not change), and the temperature kept
        # within float32 (1e-300 is 0 there): a tiny temperature then sends the others to -inf, where it was
        # inf - inf (NaN probabilities, an error from multinomial).
        temperature = max(options.temperature, torch.finfo(torch.float32).tiny)
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    logits = filter_logits(logits, options.top_k, options.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sampling_generator(seed: Optional[int], generator: Optional[torch.Generator] = None,
                       device: torch.device | str = "cpu") -> Optional[torch.Generator]:
    """The random stream to sample from: a new generator seeded with `seed`, else `generator` as given,
    else None (torch's global RNG, reproducible under `torch.manual_seed`). Not both."""
    if seed is not None and generator is not None:
        raise LMError("Pass either a seed in the sampling options or a generator, not both.")
    if seed is not None:
        return torch.Generator(device=device).manual_seed(seed)
    return generator
