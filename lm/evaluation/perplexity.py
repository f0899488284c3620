"""Perplexity and bits-per-byte of a language model on raw text: the scoring behind `lm eval`.

What this file does:
- `text_stream`: a raw file as the token stream the model is scored on (every byte, nothing cleaned);
- `window_spans`: the windows that cover the stream, non-overlapping (stride = context) or strided
  (the standard sliding-window perplexity: each token is scored once, with the most context a
  window of `context` tokens can give it);
- `score_windows`: the plain token negative log-likelihood (`lm.evaluation.token_losses.token_nll`, nats) of those
  windows, batched, token-weighted and accumulated in float64, so the result does not depend on batch size;
  `score_windows_both`: the network's softmax and a context cache's mixture from one forward pass;
- `evaluate_text_file`: one file -> {tokens, bytes, nll, loss, ppl, bpb}.

Bits-per-byte is `total NLL / ln 2 / bytes of the file as given`: the byte count is the file's size,
not the tokens' bytes, so it is the figure papers report on raw test text. The first token has no
context in the file; it is scored after `<|endoftext|>` (the document separator the model was
trained with) when the tokenizer has one, so every byte of the file is predicted. `lm test` and this
file share `lm.evaluation.token_losses.token_nll`: the same plain NLL, independent of a training objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from lm.errors import LMError, MissingFileError
from lm.evaluation.token_losses import IGNORE_INDEX, target_log_probs_by_temperature, token_nll
from lm.model.context_cache import cache_inputs
from lm.model.inference import DecodeLinear


@dataclass(frozen=True)
class WindowSpan:
    """Inputs are `stream[begin:end]`, targets `stream[begin+1:end+1]`; only targets at positions
    >= `score_from` (relative to begin) count: the earlier ones were scored by a previous window."""

    begin: int
    end: int
    score_from: int


def window_spans(num_tokens: int, context: int, stride: Optional[int] = None) -> list[WindowSpan]:
    """Windows of at most `context` inputs over a stream of `num_tokens` tokens (`num_tokens - 1`
    targets). `stride=None` or `stride == context` gives non-overlapping windows; a smaller stride
    slides the window by `stride` tokens and scores only the tokens the previous window did not."""
    stride = context if stride is None else stride
    if context <= 0 or not 0 < stride <= context:
        raise LMError(f"Need 0 < stride <= context, got stride={stride}, context={context}: "
                         f"choose a stride between 1 and the model's context ({context}).")
    num_targets = num_tokens - 1
    spans, scored_until = [], 0  # targets [0, scored_until) are done
    begin = 0
    while scored_until < num_targets:
        end = min(begin + context, num_targets)
        spans.append(WindowSpan(begin, end, scored_until - begin))
        scored_until = end
        begin += stride
    return spans


@torch.inference_mode()
def score_windows(model: nn.Module, stream: Tensor, spans: list[WindowSpan], batch_size: int = 8,
                  context_cache: bool = False) -> tuple[float, int]:
    """Summed NLL (float64 nats) and number of scored tokens of `spans` over the 1-D `stream`;
    `context_cache`: of a `GPTWithContextCache`'s mixture rather than its network's softmax."""
    return score_windows_both(model, stream, spans, batch_size, (context_cache,))[context_cache]


@torch.inference_mode()
def score_windows_both(model: nn.Module, stream: Tensor, spans: list[WindowSpan], batch_size: int = 8,
                       distributions: tuple[bool, ...] = (False,)) -> dict[bool, tuple[float, int]]:
    """`score_windows` for several distributions at once (False: the network's softmax, True: the context
    cache's mixture), from one forward pass per batch: the mixture is made of the same hidden states and
    logits, so scoring both costs one network pass, not two.

    Windows shorter than the longest in a batch are right-padded: padding comes after the real
    tokens, so under causal attention it changes nothing they see, and its targets are ignored."""
    if batch_size <= 0:
        raise LMError(f"batch_size must be positive, got {batch_size}.")
    if True in distributions and not getattr(model, "accepts_context_cache", False):
        raise LMError("This model has no context cache (its config has context_cache: false): score it without one.")
    device = next(model.parameters()).device
    totals = {cache: [0.0, 0] for cache in distributions}
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        width = max(s.end - s.begin for s in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(batch):
            n = s.end - s.begin
            inputs[row, :n] = stream[s.begin:s.end]
            targets[row, s.score_from:n] = stream[s.begin + 1 + s.score_from:s.end + 1]
        inputs, targets = inputs.to(device), targets.to(device)
        for cache, (nll, count) in _distribution_nlls(model, inputs, targets, distributions):
            totals[cache][0] += float(nll.double())
            totals[cache][1] += int(count)
    return {cache: (nll, count) for cache, (nll, count) in totals.items()}


def _distribution_nlls(model: nn.Module, inputs: Tensor, targets: Tensor, distributions: tuple[bool, ...]):
    """(distribution, (summed NLL, scored tokens)) for each asked one. With the cache among them, one pass of
    the network gives both: its hidden states and logits make the mixture (`GPTWithContextCache.forward(...,
    context_cache=True)`), whose probability is needed at the targets only (`ContextCache.target_nll`). Each
    chunk of the logits gives the log-probabilities at every asked distribution's temperature in one read
    (`target_log_probs_by_temperature`)."""
    if not hasattr(model, "head"):  # a network of a subclass (`build_model`) with logits only
        yield False, token_nll(model(inputs), targets)
        return
    hidden = model(inputs, return_hidden=True)
    scored = targets != IGNORE_INDEX
    count = scored.sum()
    temperatures = [model.context_cache.temperature.float() if cache else 1.0 for cache in distributions]
    log_probs = _target_log_probs(model.head, hidden, targets.clamp(min=0), temperatures, _packed_head(model, hidden))
    for cache, row_log_probs in zip(distributions, log_probs):
        if cache:
            yield True, (model.context_cache.target_nll(row_log_probs, hidden, *cache_inputs(hidden, inputs),
                                                        targets, IGNORE_INDEX), count)
        else:
            yield False, (-(row_log_probs * scored).sum(dtype=torch.float64), count)


HEAD_ROWS = 512  # positions whose logits `_target_log_probs` makes at a time from bf16 hidden states


def _packed_head(model: nn.Module, hidden: Tensor) -> bool:
    """Whether the LM head multiplies `hidden` by a packed oneDNN weight (a model `prepare_for_inference` made)."""
    head = getattr(model, "lm_head", None)
    return isinstance(head, DecodeLinear) and head.has_packed_weight(hidden.dtype)


def _target_log_probs(head, hidden: Tensor, targets: Tensor, temperatures: list, packed_head: bool = False) -> Tensor:
    """`target_log_probs_by_temperature(head(hidden), targets, temperatures)`. From bf16 (or other reduced
    precision) hidden states on CPU, the head's logits are made `HEAD_ROWS` positions at a time and scored while
    the CPU's cache holds them: the whole (batch x time x vocab) logits are never written to memory and read back
    (docs/results/eval-speed.md: -3 to -9% of the scoring time). From float32 ones too when the head multiplies by
    a packed oneDNN weight (`packed_head`), which runs products of `HEAD_ROWS` rows as fast as larger ones; MKL's
    smaller float32 products cost more than the saved memory traffic gives back, so without it in one product. On
    an accelerator in one product too: its bandwidth makes the whole pass cheap, and chunks would cost kernel
    launches."""
    if ((hidden.dtype == torch.float32 and not packed_head) or hidden.device.type != "cpu"
            or hidden.shape[0] * hidden.shape[1] <= HEAD_ROWS):
        return target_log_probs_by_temperature(head(hidden), targets, temperatures)
    flat_hidden, flat_targets = hidden.flatten(0, 1), targets.flatten()
    parts = [target_log_probs_by_temperature(head(chunk[None]), chunk_targets[None], temperatures)[:, 0]
             for chunk, chunk_targets in zip(flat_hidden.split(HEAD_ROWS), flat_targets.split(HEAD_ROWS))]
    return torch.cat(parts, dim=1).view(len(temperatures), *targets.shape)


def text_stream(path: str | Path, tokenizer) -> tuple[Tensor, int]:
    """(token stream, byte count) of a raw UTF-8 file: `<|endoftext|>` (if any) + every token of it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Text file not found: {path}. Check the --text_files paths.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LMError(f"{path} is not UTF-8 ({error}); bits-per-byte is defined on UTF-8 bytes: "
                         f"convert it first, e.g. `iconv -f latin1 -t utf-8 {path.name}`.") from error
    ids = tokenizer.encode(text)
    if not ids:
        raise LMError(f"{path} is empty: nothing to score.")
    prefix = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    return torch.tensor(prefix + ids, dtype=torch.long), len(raw)


def summarize(nll: float, tokens: int, num_bytes: int) -> dict[str, float]:
    """loss (nats/token), perplexity and bits-per-byte from the three sums."""
    loss = nll / max(tokens, 1)
    return {"tokens": tokens, "bytes": num_bytes, "nll": nll, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bpb": nll / (math.log(2) * num_bytes) if num_bytes else float("nan")}


def evaluate_text_file(model: nn.Module, tokenizer, path: str | Path, context: Optional[int] = None,
                       stride: Optional[int] = None, batch_size: int = 8, context_cache: bool = False) -> dict[str, float]:
    """Score one raw text file; `context` defaults to the model's (`max_position_embeddings`); `context_cache`:
    the mixture of a model that has one (`GPTWithContextCache`)."""
    return evaluate_text_file_both(model, tokenizer, path, context, stride, batch_size, (context_cache,))[context_cache]


def evaluate_text_file_both(model: nn.Module, tokenizer, path: str | Path, context: Optional[int] = None,
                            stride: Optional[int] = None, batch_size: int = 8,
                            distributions: tuple[bool, ...] = (False,)) -> dict[bool, dict[str, float]]:
    """`evaluate_text_file` for several distributions (False: the network's softmax, True: the context cache's
    mixture) from one pass over the file."""
    max_context = model.config.max_position_embeddings
    context = context or max_context
    if context > max_context:
        raise LMError(f"context={context} is longer than the model's {max_context} positions: use at most {max_context}.")
    if True in distributions and not getattr(model, "accepts_context_cache", False):
        raise LMError("This model has no context cache (its config has context_cache: false): score it without one.")
    stream, num_bytes = text_stream(path, tokenizer)
    sums = score_windows_both(model, stream, window_spans(len(stream), context, stride), batch_size, distributions)
    return {cache: summarize(nll, tokens, num_bytes) for cache, (nll, tokens) in sums.items()}
