"""`Decoder`: the one decode engine of `lm`. `generate`, `stream_generate`, `generate_text`,
`stream_text` (lm/model/generation.py) and the `lm serve` batch engine (lm/serve/engine.py) all run
the model through it; they add sampling, stopping, text and scheduling, not decoding.

How rows share one KV cache: the cache has `capacity` rows and `max_length` columns. Every step
writes each active row's new token into the same column, the write column `length`, so one forward
serves all rows. A row's tokens sit in the columns just left of `length`:
- `admit(prompts)`: the joining prompts are right-aligned so that each ends just left of the write
  column (shorter ones are left-padded) and prefilled together in one forward; returns their logits.
  Rows already active are not touched (if the prompts are wider than the columns left of the write
  column, every row first shifts right to make room);
- `step(tokens)`: one forward over the active rows, each row's token at the write column; returns the
  logits of the token after it. When the write column reaches the end, every row first shifts left
  to the oldest row's first column;
- `retire(row)`: the row leaves and its slot is reused: the last active row moves into it.

Each row is computed as if it were alone: the columns before its first token are hidden by an
attention mask and its position ids count its own tokens from 0. When every row starts in the same
column (a batch of equal prompts, or one row) no mask and no position ids are passed at all, so the
model stays on its mask-free fast path (SDPA without a mask). The one-token step goes through
`GPT.decode`, the step `prepare_for_inference(compile=True)` compiles. The cache the model sees is the
shared one, or a `KVCache.narrow` of it (the active rows, from the oldest row's first column).

`fit_prompts` is the one context-length check of every entry point: prompts that do not fit with the
tokens to generate are an error, or left-truncated when asked.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lm.errors import LMError
from lm.model.inference import GUARD_FREE_AFTER_STEPS, skipping_guards

Prompts = Union[Tensor, Sequence[Sequence[int]]]

# How each entry point spells the option (the error is raised the same way for all of them).
TRUNCATE_HINT = ("set truncate (`--truncate true` for lm generate, `--model.sampling.truncate true` for lm predict, "
                 "truncate=True in Python)")


def fit_prompts(input_ids: Prompts, context: int, max_new_tokens: int, truncate: bool = False) -> list[list[int]]:
    """Prompts as lists of ids, checked (or, with `truncate`, left-truncated) against a context of
    `context` tokens that must also hold `max_new_tokens` new ones. Raises `LMError` saying what fits."""
    if max_new_tokens < 0:
        raise LMError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise LMError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}.")
        rows = input_ids.tolist()
    else:
        rows = [list(map(int, row)) for row in input_ids]
    if not rows:
        raise LMError("No prompts given.")
    if any(len(row) == 0 for row in rows):
        raise LMError("Empty prompt: generation needs at least one token to condition on "
                      "(e.g. start the prompt with the end-of-text token).")
    room = context - max_new_tokens  # prompt tokens that fit next to the generated ones
    longest = max(len(row) for row in rows)
    if longest <= room:
        return rows
    if room <= 0:  # no prompt fits: truncating cannot help, only fewer new tokens can
        raise LMError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context, "
            f"max_position_embeddings={context}: with this {longest}-token prompt at most "
            f"{max(context - longest, 0)} new tokens fit; ask for that many or fewer (--max_new_tokens {max(context - longest, 1)})."
        )
    if truncate:
        return [row[-room:] for row in rows]
    if longest > context:
        raise LMError(
            f"Prompt of {longest} tokens is longer than the model's context, max_position_embeddings={context}. "
            f"Shorten it to at most {room} tokens (the context minus max_new_tokens={max_new_tokens}), or {TRUNCATE_HINT} "
            f"to keep only its last {room} tokens."
        )
    raise LMError(
        f"Prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} tokens "
        f"exceeds the model's context, max_position_embeddings={context}. Lower max_new_tokens to at most "
        f"{context - longest}, or {TRUNCATE_HINT} to keep only the last {room} prompt tokens."
    )


class Decoder:
    """Runs `model` over up to `capacity` rows that join (`admit`) and leave (`retire`) between steps.

    Args:
        model: a `GPT`, or any module with GPT's forward signature, `config.max_position_embeddings`
            and `new_kv_cache(batch_size, max_length)`; `decode` (GPT's one-token step) is used if it has one.
            The caller sets eval and inference mode (every call of a decoder must run in the same mode).
        capacity: most rows decoded together (the KV cache's rows).
        max_length: the cache's columns (default: the model's context). A row holds at most this many
            tokens; rows that joined at different times fit together as long as their tokens do.
        context_cache: sample the context cache's mixture (`SamplingOptions.context_cache`). The keyword
            reaches only models that have a context cache, so any module with GPT's forward decodes.
        use_cache: False re-runs every row's whole sequence each step (the slow reference path).

    `rows` is the number of active rows; row i of every result is the i-th active row.
    """

    def __init__(self, model: nn.Module, capacity: int, max_length: Optional[int] = None, *,
                 context_cache: bool = False, use_cache: bool = True):
        if capacity <= 0:
            raise LMError(f"A decoder needs at least one row, got capacity={capacity}.")
        self.model = model
        self.cache_kwargs: dict[str, Any] = ({"context_cache": True}  # GPTWithContextCache's mixture
                                             if context_cache and getattr(model, "accepts_context_cache", False) else {})
        self.decode = getattr(model, "decode", model)  # GPT.decode: compiled after prepare_for_inference
        self.device = next(model.parameters()).device
        self.capacity = capacity
        self.max_length = max_length or model.config.max_position_embeddings
        self.cache = (model.new_kv_cache(capacity, max_length=self.max_length, **self.cache_kwargs)
                      if use_cache else None)
        # Without a KV cache, every row's tokens are kept to run again.
        self.ids = None if use_cache else torch.zeros(capacity, self.max_length, dtype=torch.long, device=self.device)
        self.length = 0  # the write column: every row's next token goes there
        self.starts: list[int] = []  # first column of each active row
        self._columns = torch.arange(self.max_length, device=self.device)
        self._layout()

    @property
    def rows(self) -> int:
        return len(self.starts)

    # ------------------------------------------------------------------------------ rows
    def admit(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """Prefill `prompts` as new rows (they become rows `rows`, `rows + 1`, ...); return their logits
        (len(prompts), V) for the first new token. Fails without changing the active rows."""
        prompts = [list(p) for p in prompts]
        n, lengths = self.rows, [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise LMError("Nothing to prefill: give at least one prompt of at least one token.")
        if n + len(prompts) > self.capacity:
            raise LMError(f"{len(prompts)} prompts do not fit next to the {n} active rows of a decoder "
                          f"of {self.capacity} rows.")
        width = max(lengths)
        if width > self.max_length:
            raise LMError(f"A prompt of {width} tokens does not fit the decoder's {self.max_length} columns.")
        if n == 0:
            self.length = 0  # empty (even after a failed prefill): start at column 0
        if self.length < width:
            self.shift(width - self.length)  # make room left of the write column
        end, first = self.length, self.length - width
        starts = [end - length for length in lengths]
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)
        position_ids = attention_mask = None
        if min(lengths) != width:  # left padding: hidden by the mask, each row's positions count from 0
            columns, row_starts = self._columns[first:end], torch.tensor(starts, device=self.device)[:, None]
            attention_mask = (columns >= row_starts).long()
            position_ids = (columns - row_starts).clamp(min=0)
        rows = slice(n, n + len(prompts))
        if self.cache is not None:
            logits = self.model(ids, kv_cache=self._kv_cache(rows, first, 0), position_ids=position_ids,
                                attention_mask=attention_mask, **self.cache_kwargs)
        else:
            logits = self.model(ids, position_ids=position_ids, attention_mask=attention_mask, **self.cache_kwargs)
            self.ids[rows, first:end] = ids
        self.starts += starts
        self._layout()
        return logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per active row (`tokens`, shape (rows,)) at the write column; return the logits
        (rows, V) of the token after it."""
        n = self.rows
        if n == 0:
            raise LMError("No active rows to decode: admit prompts first.")
        if self.length == self.max_length:
            if self._low == 0:
                raise LMError(f"The decoder's {self.max_length} columns are full: a row has reached its length.")
            self.shift(-self._low)  # move every row left to the oldest row's first column
        end, low = self.length, self._low
        position_ids = attention_mask = None
        if self._mask is not None:
            attention_mask = self._mask[:, low:end + 1]
        if self.cache is not None:
            if self._mask is not None:
                position_ids = (end - self._start_tensor)[:, None]
            steady = (self._steps_since_layout >= GUARD_FREE_AFTER_STEPS
                      and getattr(self.model, "decode_step", None) is not None)
            with skipping_guards(steady):
                logits = self.decode(tokens[:, None], kv_cache=self._kv_cache(slice(0, n), low, end - low),
                                     position_ids=position_ids, attention_mask=attention_mask, **self.cache_kwargs)
        else:  # reference path: every row's whole sequence again
            self.ids[:n, end] = tokens
            if self._mask is not None:
                position_ids = (self._columns[low:end + 1] - self._start_tensor[:, None]).clamp(min=0)
            logits = self.model(self.ids[:n, low:end + 1], position_ids=position_ids,
                                attention_mask=attention_mask, **self.cache_kwargs)
        self.length = end + 1
        self._steps_since_layout += 1
        return logits[:, -1]

    def retire(self, row: int) -> None:
        """Row `row` leaves; the last active row moves into its slot (takes index `row`)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not active ({self.rows} rows are).")
        if row != last:
            for t, _ in self._per_position():
                t[row] = t[last]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.length = 0  # empty: the next prompts start at column 0
        self._layout()

    def clear(self) -> None:
        """Retire every row (e.g. after a failed step)."""
        self.starts, self.length = [], 0
        self._layout()

    def shift(self, offset: int) -> None:
        """Move every active row's columns by `offset` (negative: left), and the write column with them.
        `admit` and `step` call it when the columns run out."""
        if offset == 0:
            return
        n, end, low = self.rows, self.length, self._low
        if n == 0:
            self.length = max(end + offset, 0)
            return
        if low + offset < 0 or end + offset > self.max_length:
            raise LMError(f"Cannot shift the decoder's columns {low}..{end} by {offset} within {self.max_length}.")
        source, target = slice(low, end), slice(low + offset, end + offset)
        for t, dim in self._per_position():
            t[_columns(dim, n, target)] = t[_columns(dim, n, source)].clone()
        self.starts = [start + offset for start in self.starts]
        self.length = end + offset
        self._layout()

    # ------------------------------------------------------------------------------ internals
    def _layout(self) -> None:
        """After rows or columns changed: the oldest row's first column, and (only when the rows start in
        different columns) the attention mask (rows, max_length) and the start columns positions count from."""
        self._low = min(self.starts, default=0)
        self._steps_since_layout = 0  # the next steps run fully guarded (inference.skipping_guards)
        self._start_tensor = torch.tensor(self.starts, dtype=torch.long, device=self.device)
        self._mask: Optional[Tensor] = None
        if len(set(self.starts)) > 1:
            self._mask = (self._columns >= self._start_tensor[:, None]).long()

    def _kv_cache(self, rows: slice, start: int, length: int):
        """The cache a forward over `rows` sees: from column `start`, `length` columns written."""
        if rows.start == 0 and rows.stop == self.capacity and start == 0:
            self.cache.length = length  # the whole cache (and the only case a model's own cache type needs)
            return self.cache
        return self.cache.narrow(rows, start, length)

    def _per_position(self) -> list[tuple[Tensor, int]]:
        """Every tensor with one entry per row and column, with its column dimension."""
        pairs = self.cache.per_position() if self.cache is not None else []
        return pairs + ([(self.ids, 1)] if self.ids is not None else [])


def _columns(dim: int, rows: int, columns: slice) -> tuple:
    """The index of the first `rows` rows x `columns` in a tensor whose columns are dimension `dim`."""
    return (slice(0, rows),) + (slice(None),) * (dim - 1) + (columns,)
