"""Continuous batching for `lm serve`: one background thread decodes every active request together.

What this file does:
- `GenerationRequest`: one request's prompt ids, its own `SamplingOptions` and a callback that
  receives its `Event`s (text pieces, then one `Finished` or `Failed`).
- `BatchEngine`: scheduling around one `lm.model.Decoder` (the decode engine `generate_text` and
  `stream_text` run too): a queue of waiting requests, admission into free rows between steps,
  cancellation (client gone), per-request sampling and text, events, and the thread. Each step is one
  shared forward over every active request; between steps new requests join (their prompts are
  prefilled together) and requests that finished, hit a stop string or were cancelled leave, so a short
  request never waits for a long one.

The decoder computes every row as if it were alone (its own position ids, the other rows' columns
masked), so greedy results equal `generate_text`'s and a seeded request samples exactly as
`stream_text` with the same seed: the same `sample_next_token` on the same logits, from a generator
seeded the same way (`sampling_generator`), and the same `TextAssembler` (UTF-8 safe pieces, stop strings).
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
from lm.model.decoder import Decoder, fit_prompts
from lm.model.sampling import SamplingOptions, recent_tokens, sample_next_token, sampling_generator, with_latest
from lm.model.text_stream import TextAssembler

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
    """A request that holds a row of the decoder (row i of the decoder is `BatchEngine._active[i]`)."""

    request: GenerationRequest
    assembler: TextAssembler
    generator: Optional[torch.Generator]
    recent: Optional[Tensor] = None  # (1, repetition_window) latest ids, for the repetition penalty
    pending: int = -1  # sampled token not yet fed to the model
    generated: int = 0
    finish_reason: Optional[str] = None


# --------------------------------------------------------------------------------------- engine
class BatchEngine:
    """Owns the model while running: `submit` requests from any thread; `start`/`stop` the loop.

    Args:
        model: a `GPT` in eval mode (anything `lm.model.Decoder` runs: `config`, `new_kv_cache`, GPT's forward).
        tokenizer: the checkpoint's tokenizer (`eot_id`, `encode`, `decode_bytes`).
        max_batch_size: slots, i.e. requests decoded together (the decoder's rows); more wait in a queue.
        max_waiting: requests allowed to wait for a slot; beyond that `submit` raises `EngineBusy`.
        context_cache: every request samples the context cache's mixture (`SamplingOptions.context_cache`).
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 16, max_waiting: int = 256,
                 context_cache: bool = False):
        if max_batch_size <= 0:
            raise LMError(f"max_batch_size must be positive, got {max_batch_size}.")
        self.model = model
        self.context_cache = context_cache
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.decoder: Optional[Decoder] = None  # made by the engine thread, in its inference mode
        self._waiting: "queue.Queue[GenerationRequest]" = queue.Queue()
        self._active: list[_Active] = []  # row i of the decoder belongs to self._active[i]
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
        fit_prompts([request.prompt_ids], self.context, request.options.max_new_tokens)  # raises if it does not fit
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
        # Inference mode is per thread: the decoder's cache is made here, so it is only ever used in it.
        with torch.inference_mode():
            self.decoder = Decoder(self.model, capacity=self.max_batch_size, max_length=self.context,
                                   context_cache=self.context_cache)
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
                    self.decoder.clear()

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
                    request.cancel()  # if it got a row, the row is dropped before the next step

    def _prefill(self, joiners: list[GenerationRequest]) -> None:
        logits = self.decoder.admit([r.prompt_ids for r in joiners])  # (J, V); they are the decoder's last rows
        rows = [_Active(r, assembler=TextAssembler(self.tokenizer, r.options.stop),
                        generator=sampling_generator(r.options.seed, None, self.device)) for r in joiners]
        self._active += rows
        for j, row in enumerate(rows):
            self._take_token(row, logits[j:j + 1])
        self._retire_finished()

    def _decode_step(self) -> None:
        """Feed every row's pending token in one forward; sample each row's next token."""
        tokens = torch.tensor([row.pending for row in self._active], device=self.device)
        logits = self.decoder.step(tokens)
        self.steps += 1
        for i, row in enumerate(self._active):
            self._take_token(row, logits[i:i + 1])
        self._retire_finished()

    def _take_token(self, row: _Active, logits: Tensor) -> None:
        """Sample a row's next token from its logits (1, V) with its own options and emit its text."""
        options = row.request.options
        if row.recent is None:
            row.recent = recent_tokens([row.request.prompt_ids], options.repetition_window, self.device)
        sampled = sample_next_token(logits, options, row.generator, row.recent)
        row.recent = with_latest(row.recent, sampled)
        token = int(sampled[0])
        row.generated += 1
        self.tokens_generated += 1
        piece = row.assembler.feed(token)
        if piece:
            row.request.on_event(Piece(piece))
        if row.assembler.stopped:  # end-of-text or a stop string
            row.finish_reason = "stop"
        elif (row.generated >= options.max_new_tokens
              or len(row.request.prompt_ids) + row.generated > self.context):  # no position left to feed it at
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
                self._retire(i)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._active))):
            if self._active[i].request.cancelled:
                self._retire(i)

    def _retire(self, i: int) -> None:
        """Row i leaves the decoder, whose last row moves into its slot: mirror that here."""
        self.decoder.retire(i)
        self._active[i] = self._active[-1]
        self._active.pop()
