"""Continuous batching for `lm serve`: one background thread decodes every active request together.

What this file does:
- `GenerationRequest`: one request's prompt ids, its own `SamplingOptions` and a callback that
  receives its `Event`s (text pieces, then one `Finished` or `Failed`).
- `BatchEngine`: a thread that runs one shared forward per step over all active requests. Between
  steps, new requests join (their prompts are prefilled together) and requests that finished, hit a
  stop string or were cancelled (client gone) leave, so a short request never waits for a long one.

How the requests share one KV cache: the cache has one row ("slot") per possible request and as many
columns as the model's context. Every step writes each active row's new token into the same column
`length`, so the cache's own write position serves all rows. A request's tokens sit in the columns
just left of `length` (its prompt is right-aligned when it joins, like the left-padded batches of
`lm.model.generate`); the columns before them are hidden by the attention mask and each row has its
own position ids, so every row is computed as if it were alone (greedy results equal
`generate_text`'s; a seeded request samples exactly as `stream_text` with the same seed). When
`length` reaches the end, all rows are shifted left to the oldest active request's first column.

The prefill reuses `_Decoder` (left padding, masks, position ids) and the text reuses
`_TextAssembler` (UTF-8 safe pieces, stop strings) from `lm.model.generate`.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from lm.errors import LMError
from lm.model.generate import SamplingOptions, _Decoder, _TextAssembler, sample_next_token

log = logging.getLogger("lm.serve")


# --------------------------------------------------------------------------------------- events
@dataclass
class Piece:
    """New text of a request, safe to show (never half a character or a partial stop string)."""
    text: str


@dataclass
class Finished:
    """The request ended: `reason` is "stop" (end-of-text or a stop string) or "length" (max tokens)."""
    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request could not be completed; the server goes on serving the others."""
    message: str


Event = Union[Piece, Finished, Failed]


class EngineBusy(Exception):
    """The waiting queue is full: the caller should answer 429 and the client retry later."""


@dataclass(eq=False)
class GenerationRequest:
    """One completion to produce. `on_event` is called from the engine thread, in order."""

    prompt_ids: list[int]
    options: SamplingOptions
    on_event: Callable[[Event], None]
    cancelled: bool = False  # set by the server when the client went away; the slot is freed next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Active:
    """A request that holds a slot (a cache row)."""

    request: GenerationRequest
    start: int  # first cache column of its prompt
    position: int  # position id of the next token to feed (= tokens so far)
    assembler: _TextAssembler
    generator: Optional[torch.Generator]
    pending: int = -1  # sampled token not yet fed to the model
    generated: int = 0
    finish_reason: Optional[str] = None


# --------------------------------------------------------------------------------------- engine
class BatchEngine:
    """Owns the model while running: `submit` requests from any thread; `start`/`stop` the loop.

    Args:
        model: a `GPT` in eval mode (anything with `config`, `new_kv_cache` and GPT's forward).
        tokenizer: the checkpoint's tokenizer (`eot_id`, `encode`, `decode_bytes`).
        max_batch_size: slots, i.e. requests decoded together; more wait in a queue.
        max_waiting: requests allowed to wait for a slot; beyond that `submit` raises `EngineBusy`.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 16, max_waiting: int = 256,
                 context_cache: bool = False):
        if max_batch_size <= 0:
            raise LMError(f"max_batch_size must be positive, got {max_batch_size}.")
        self.model = model
        self.context_cache = context_cache  # every request samples the cache's mixture (SamplingOptions.context_cache)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self._waiting: "queue.Queue[GenerationRequest]" = queue.Queue()
        self._active: list[_Active] = []  # slot i of the cache belongs to self._active[i]
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.steps = 0  # shared decode forwards run so far
        self.tokens_generated = 0

    # ------------------------------------------------------------------------------ public API
    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return self._waiting.qsize()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> None:
        if request.options.max_new_tokens < 1:
            raise LMError("max_new_tokens must be at least 1 for a served request.")
        room = self.context - request.options.max_new_tokens
        if not 0 < len(request.prompt_ids) <= min(room, self.context - 1):
            raise LMError(f"A prompt of {len(request.prompt_ids)} tokens with max_new_tokens="
                             f"{request.options.max_new_tokens} does not fit the context of {self.context} tokens "
                             f"(and a prompt needs at least one token).")
        if self._waiting.qsize() >= self.max_waiting:
            raise EngineBusy(f"{self._waiting.qsize()} requests are already waiting for a slot: retry later.")
        self._waiting.put(request)

    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._run, name="lm-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        # Inference mode is per thread: the cache is made here, so it is only ever used in it.
        with torch.inference_mode():
            self._cache_kwargs = ({"context_cache": self.context_cache}
                                  if getattr(self.model, "context_cache", None) is not None else {})
            self.cache = self.model.new_kv_cache(self.max_batch_size, max_length=self.context, **self._cache_kwargs)
            self.mask = torch.zeros(self.max_batch_size, self.context, dtype=torch.long, device=self.device)
            self._view = self.model.new_kv_cache(1, max_length=1, **self._cache_kwargs)  # re-pointed at slices of self.cache
            self.cache.length = 0
            while not self._stopping.is_set():
                try:
                    self._admit()
                    self._drop_cancelled()
                    if self._active:
                        self._decode_step()
                except Exception as error:  # a bug or an OOM must not take the server down
                    log.exception("engine step failed; failing the %d active requests", len(self._active))
                    for row in self._active:
                        row.request.on_event(Failed(f"generation failed: {error}"))
                    self._active.clear()
                    self.cache.length = 0

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them (blocks briefly when idle)."""
        joiners: list[GenerationRequest] = []
        while len(self._active) + len(joiners) < self.max_batch_size:
            try:
                block = not self._active and not joiners
                request = self._waiting.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                break
            if not request.cancelled:
                joiners.append(request)
        if joiners:
            try:
                self._prefill(joiners)
            except Exception as error:  # e.g. a prompt the model rejects: only these requests fail
                log.exception("prefill failed for %d requests", len(joiners))
                for request in joiners:
                    request.on_event(Failed(f"prefill failed: {error}"))

    def _prefill(self, joiners: list[GenerationRequest]) -> None:
        rows = [r.prompt_ids for r in joiners]
        decoder = _Decoder(self.model, rows, max_new_tokens=0, context_cache=self.context_cache)
        logits = decoder.prefill()  # (J, V); decoder.kv_cache holds the prompts right-aligned
        width = decoder.prompt_length
        if self.cache.length < width:
            self._shift(width - self.cache.length)  # make room left of the write column
        end = self.cache.length
        for j, request in enumerate(joiners):
            slot = len(self._active)
            for (target, dim), (source, _) in zip(self.cache.per_position(), decoder.kv_cache.per_position()):
                target[_columns(dim, slot, slice(end - width, end))] = source[j]
            self.mask[slot].zero_()
            self.mask[slot, end - len(rows[j]):end] = 1
            options = request.options
            generator = (torch.Generator(device=self.device).manual_seed(options.seed)
                         if options.seed is not None else None)
            row = _Active(request, start=end - len(rows[j]), position=len(rows[j]),
                          assembler=_TextAssembler(self.tokenizer, options.stop), generator=generator)
            self._active.append(row)
            self._take_token(row, logits[j:j + 1])
        self._retire_finished()

    def _decode_step(self) -> None:
        """Feed every row's pending token in one forward; sample each row's next token."""
        if self.cache.length == self.context:
            self._shift(-min(row.start for row in self._active))
        n, end = len(self._active), self.cache.length
        low = min(row.start for row in self._active)  # columns before every row's start are skipped
        tokens = torch.tensor([[row.pending] for row in self._active], device=self.device)
        positions = torch.tensor([[row.position] for row in self._active], device=self.device)
        self.mask[:n, end] = 1
        view = self._view
        view.keys = [k[:n, :, low:] for k in self.cache.keys]
        view.values = [v[:n, :, low:] for v in self.cache.values]
        if self.cache.hidden is not None:  # the context cache's hidden states and ids
            view.hidden, view.ids = self.cache.hidden[:n, low:], self.cache.ids[:n, low:]
        view.max_length, view.length = self.context - low, end - low
        decode = getattr(self.model, "decode", self.model)
        logits = decode(tokens, kv_cache=view, position_ids=positions,
                        attention_mask=self.mask[:n, low:end + 1], **self._cache_kwargs)[:, -1]
        self.cache.length = end + 1
        self.steps += 1
        for i, row in enumerate(self._active):
            row.position += 1
            self._take_token(row, logits[i:i + 1])
        self._retire_finished()

    def _take_token(self, row: _Active, logits: Tensor) -> None:
        """Sample a row's next token from its logits (1, V) with its own options and emit its text."""
        options = row.request.options
        token = int(sample_next_token(logits, options, row.generator)[0])
        row.generated += 1
        self.tokens_generated += 1
        piece = row.assembler.feed(token)
        if piece:
            row.request.on_event(Piece(piece))
        if row.assembler.stopped:  # end-of-text or a stop string
            row.finish_reason = "stop"
        elif row.generated >= options.max_new_tokens or row.position + 1 > self.context:
            piece = row.assembler.finish()
            if piece:
                row.request.on_event(Piece(piece))
            row.finish_reason = "length"
        row.pending = token

    def _retire_finished(self) -> None:
        for i in reversed(range(len(self._active))):
            row = self._active[i]
            if row.finish_reason is not None:
                row.request.on_event(Finished(row.finish_reason, len(row.request.prompt_ids), row.generated))
                self._free_slot(i)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._active))):
            if self._active[i].request.cancelled:
                self._free_slot(i)

    def _free_slot(self, i: int) -> None:
        """Remove row i; the last row moves into its slot so the active rows stay rows 0..n-1."""
        last = len(self._active) - 1
        if i != last:
            for t, _ in self.cache.per_position():
                t[i] = t[last]
            self.mask[i] = self.mask[last]
            self._active[i] = self._active[last]
        self._active.pop()
        if not self._active:
            self.cache.length = 0  # idle: the next batch starts at column 0

    def _shift(self, offset: int) -> None:
        """Move every active row's columns by `offset` (negative: left) and the write column with them."""
        if offset == 0:
            return
        n, end = len(self._active), self.cache.length
        if n == 0:
            self.cache.length = end + offset if offset > 0 else 0
            return
        src = slice(max(0, -offset), end)
        dst = slice(max(0, offset), end + offset)
        for t, dim in self.cache.per_position():
            t[_columns(dim, slice(0, n), dst)] = t[_columns(dim, slice(0, n), src)].clone()
        self.mask[:n, dst] = self.mask[:n, src].clone()
        if offset > 0:
            self.mask[:n, :offset] = 0
        else:
            self.mask[:n, end + offset:] = 0
        for row in self._active:
            row.start += offset
        self.cache.length = end + offset


def _columns(dim: int, rows, columns: slice) -> tuple:
    """The index of `rows` x `columns` in a tensor whose columns are dimension `dim`."""
    return (rows,) + (slice(None),) * (dim - 1) + (columns,)
