"""Autoregressive generation for `GPT`: token level (`generate`, `stream_generate`) and text level
(`generate_text`, `stream_text`). No Lightning here, so the CLI, a server or a notebook can all use it.

How a call runs:
- the prompts are left-padded to one length, with `position_ids` and an `attention_mask` that hide
  the padding, so every row is computed exactly as if it were alone in the batch;
- the prompt is run once (prefill) into a preallocated KV cache, then one token per step, each step
  attending to the cache (`use_cache=False` re-runs the whole sequence instead: a reference and a
  benchmark baseline);
- the next token is greedy (`temperature=0`) or sampled with temperature / top-k / top-p, all read from
  one `SamplingOptions` (or keyword overrides of its fields: `generate(model, ids, temperature=0)`);
- a row stops at `eos_id` (text level: the tokenizer's end-of-text id or a stop string); the loop ends
  when every row stopped or after `max_new_tokens`.

Context length policy: the prompt plus `max_new_tokens` must fit in `max_position_embeddings`.
Otherwise `ValueError`, unless `truncate=True`, which keeps only the last
`max_position_embeddings - max_new_tokens` prompt tokens (left truncation). Nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import contextlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from lm.errors import LMError

Prompts = Union[Tensor, Sequence[Sequence[int]]]


class TextTokenizer(Protocol):
    """What the text-level functions need from `lm.data.tokenizer.Tokenizer`."""

    eot_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...


# ------------------------------------------------------------------------------------- sampling
@dataclass
class SamplingOptions:
    """How to sample: the one typed source of these settings for every caller (the functions below,
    `lm generate`, `lm predict`, the `TextSampler` callback, the server). Same defaults, same checks.

    Args:
        max_new_tokens: Most tokens to generate per prompt.
        temperature: 0 is greedy; otherwise the softmax temperature for sampling.
        top_k: Sample only among the k most likely tokens (None: no limit).
        top_p: Nucleus sampling: the smallest set of tokens with probability mass >= top_p (None: off).
        seed: Seed of the sampler's generator, for reproducible samples (None: torch's global RNG).
        stop: Strings that end a completion (cut before the first one); one string or a list. Text
            level only (`generate_text`, `stream_text`).
        truncate: Keep only the last tokens of a prompt too long for the context (else an error).
        context_cache: Sample from the context cache's mixture, for a model that has one
            (`GPTConfig.context_cache`). Off by default: the cache lowers the scored loss but, sampled,
            copies the model's own mistakes back into the text (repeated phrases; measured by
            benchmarks/generation_quality.py). `lm eval`, `lm test` and `lm validate` always score with it.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = field(default=None)
    truncate: bool = False
    context_cache: bool = False

    def __post_init__(self) -> None:
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
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(logits: Tensor, options: SamplingOptions,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V), with `options`' temperature, top-k, top-p.

    `temperature=0` is greedy (argmax; top-k/top-p do not change the argmax). Otherwise the logits are
    divided by the temperature, filtered by `filter_logits` and sampled in float32 (bf16 probabilities
    are too coarse for `multinomial`).
    """
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if options.temperature != 1.0:
        logits = logits / options.temperature
    logits = filter_logits(logits, options.top_k, options.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _make_generator(seed: Optional[int], generator: Optional[torch.Generator],
                    device: torch.device) -> Optional[torch.Generator]:
    if seed is not None and generator is not None:
        raise LMError("Pass either a seed in the sampling options or a generator, not both.")
    if seed is not None:
        return torch.Generator(device=device).manual_seed(seed)
    return generator  # None: torch's global RNG (reproducible under torch.manual_seed)


# -------------------------------------------------------------------------------- prompt checks
def _prepare_rows(model: nn.Module, input_ids: Prompts, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    """Prompts as lists of ids, checked (or left-truncated) against the model's context length."""
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
    context = model.config.max_position_embeddings
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
            f"Shorten it to at most {room} tokens (the context minus max_new_tokens={max_new_tokens}), or {_TRUNCATE} "
            f"to keep only its last {room} tokens."
        )
    raise LMError(
        f"Prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} tokens "
        f"exceeds the model's context, max_position_embeddings={context}. Lower max_new_tokens to at most "
        f"{context - longest}, or {_TRUNCATE} to keep only the last {room} prompt tokens."
    )


# How each entry point spells the option (the error is raised the same way for all of them).
_TRUNCATE = ("set truncate (`--truncate true` for lm generate, `--model.sampling.truncate true` for lm predict, "
             "truncate=True in Python)")


# --------------------------------------------------------------------------------- decode loop
class _Decoder:
    """Runs the model over a left-padded batch: `prefill()` once, then `step(tokens)` per new token.

    Everything a step needs is allocated here, once: the token buffer, the KV cache, and (only when
    the prompts have different lengths) the attention mask and position ids, of which a step takes
    slices (views, no allocation). With equal lengths no mask is passed at all, so the model stays on
    its mask-free fast path (SDPA without a mask).
    """

    def __init__(self, model: nn.Module, rows: list[list[int]], max_new_tokens: int, use_cache: bool = True,
                 context_cache: bool = False):
        self.model = model
        # The context cache's mixture (SamplingOptions.context_cache): the keyword only reaches models that have
        # one, so any module with GPT's forward signature can be decoded.
        self.cache_kwargs = ({"context_cache": context_cache}
                             if getattr(model, "context_cache", None) is not None else {})
        self.device = next(model.parameters()).device
        self.lengths = [len(row) for row in rows]
        self.batch_size = len(rows)
        self.prompt_length = max(self.lengths)
        total = self.prompt_length + max_new_tokens
        self.ids = torch.zeros(self.batch_size, total, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            self.ids[i, self.prompt_length - len(row):self.prompt_length] = torch.tensor(row, dtype=torch.long)
        self.attention_mask: Optional[Tensor] = None
        self.position_ids: Optional[Tensor] = None
        if min(self.lengths) != self.prompt_length:
            # 0 for left padding; positions count real tokens only, so row i starts at position 0
            # like it would alone (padding gets position 0 too; it is masked out anyway).
            mask = torch.ones(self.batch_size, total, dtype=torch.long, device=self.device)
            for i, length in enumerate(self.lengths):
                mask[i, :self.prompt_length - length] = 0
            self.attention_mask = mask
            self.position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        self.use_cache = use_cache
        self.kv_cache = (model.new_kv_cache(self.batch_size, max_length=max(total, 1), **self.cache_kwargs)
                         if use_cache else None)
        self.length = 0  # tokens (incl. padding) in self.ids so far

    def _slice(self, t: Optional[Tensor], start: int, end: int) -> Optional[Tensor]:
        return None if t is None else t[:, start:end]

    def prefill(self) -> Tensor:
        """Run the prompts; return the logits (B, V) for the first new token."""
        self.length = self.prompt_length
        logits = self.model(
            self.ids[:, :self.length], kv_cache=self.kv_cache,
            position_ids=self._slice(self.position_ids, 0, self.length),
            attention_mask=self._slice(self.attention_mask, 0, self.length), **self.cache_kwargs,
        )
        return logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Append `tokens` (B,) and return the logits (B, V) for the token after them."""
        start = self.length
        self.ids[:, start] = tokens
        self.length = end = start + 1
        if self.use_cache:
            decode = getattr(self.model, "decode", self.model)  # GPT.decode: compiled after prepare_for_inference
            logits = decode(
                self.ids[:, start:end], kv_cache=self.kv_cache,
                position_ids=self._slice(self.position_ids, start, end),
                attention_mask=self._slice(self.attention_mask, 0, end), **self.cache_kwargs,
            )
        else:  # reference path: the whole sequence again
            logits = self.model(
                self.ids[:, :end], position_ids=self._slice(self.position_ids, 0, end),
                attention_mask=self._slice(self.attention_mask, 0, end), **self.cache_kwargs,
            )
        return logits[:, -1]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the duration (no dropout), then restore the previous training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _token_steps(model: nn.Module, rows: list[list[int]], options: SamplingOptions, *, eos_id: Optional[int],
                 generator: Optional[torch.Generator], use_cache: bool,
                 per_step_inference_mode: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(tokens, finished)` per step: the new tokens (B,) and which rows are done after it.

    A row that produced `eos_id` is finished; its later tokens are `eos_id` again (padding). The
    caller may also finish rows itself (stop strings) by setting `finished[i] = True` in place.
    The caller must run this under eval mode. For streaming, `per_step_inference_mode` enters
    inference mode around each step only, so the caller's code between steps is not affected.
    """
    mode = torch.inference_mode if per_step_inference_mode else contextlib.nullcontext
    max_new_tokens = options.max_new_tokens
    with mode():
        decoder = _Decoder(model, rows, max_new_tokens, use_cache, options.context_cache)
        finished = torch.zeros(decoder.batch_size, dtype=torch.bool, device=decoder.device)
        if max_new_tokens == 0:
            return
        logits = decoder.prefill()
    for step in range(max_new_tokens):
        with mode():
            tokens = sample_next_token(logits, options, generator)
            if eos_id is not None:
                tokens = tokens.masked_fill(finished, eos_id)
                finished |= tokens == eos_id
        yield tokens, finished
        # One host sync per step; negligible on CPU, and it is what lets batches end early.
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        with mode():
            logits = decoder.step(tokens)


# ---------------------------------------------------------------------------------- token API
def generate(model: nn.Module, input_ids: Prompts, options: Optional[SamplingOptions] = None, *,
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None, use_cache: bool = True,
             **overrides: Any) -> Union[Tensor, list[list[int]]]:
    """Continue each prompt by up to `options.max_new_tokens` tokens.

    Args:
        model: a `GPT` (anything with `.config.max_position_embeddings`, `new_kv_cache` and the GPT
            forward signature). Run in eval mode (no dropout); its training flag is restored after.
        input_ids: a (B, T) tensor, or a list of id lists that may have different lengths (they are
            left-padded internally; each row's result equals generating it alone).
        options: how to sample (`SamplingOptions`; default `SamplingOptions()`), e.g.
            `SamplingOptions(max_new_tokens=20, temperature=0)`; `truncate` left-truncates prompts that
            do not fit the context (see the module docstring), else they raise `ValueError`.
        eos_id: a row stops after producing this id (it is included in the output).
        generator: a `torch.Generator` to sample from (instead of `options.seed`).
        use_cache: False re-runs the whole sequence every step (slow reference path).
        **overrides: `SamplingOptions` fields replacing those of `options`, e.g. `temperature=0`.

    Returns:
        For a tensor input: a (B, T + n) long tensor, prompt then generated ids, n <= max_new_tokens
        (fewer when every row hit `eos_id`); a row that stopped early is filled with `eos_id` after it.
        With `truncate` the prompt part is the truncated prompt.
        For a list input: one list per prompt, prompt + generated ids up to and including `eos_id`.
    """
    options = SamplingOptions.resolve(options, **overrides)
    rows = _prepare_rows(model, input_ids, options.max_new_tokens, options.truncate)
    device = next(model.parameters()).device
    gen = _make_generator(options.seed, generator, device)
    new = torch.empty(len(rows), options.max_new_tokens, dtype=torch.long, device=device)
    n = 0
    with _eval_mode(model), torch.inference_mode():
        for tokens, _ in _token_steps(model, rows, options, eos_id=eos_id, generator=gen, use_cache=use_cache,
                                      per_step_inference_mode=False):
            new[:, n] = tokens
            n += 1
    new = new[:, :n].clone()  # out of inference mode's reach: a normal tensor for the caller
    if isinstance(input_ids, Tensor):
        prompt = torch.tensor(rows, dtype=torch.long, device=device)
        return torch.cat([prompt, new], dim=1)
    out = []
    for row, generated in zip(rows, new.tolist()):
        if eos_id is not None and eos_id in generated:
            generated = generated[:generated.index(eos_id) + 1]
        out.append(row + generated)
    return out


def stream_generate(model: nn.Module, input_ids: Union[Tensor, Sequence[int]],
                    options: Optional[SamplingOptions] = None, *, eos_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None, use_cache: bool = True,
                    **overrides: Any) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are decoded (`eos_id` is yielded, then it ends).

    `input_ids` is a list of ids, a (T,) or a (1, T) tensor. Same arguments and results as
    `generate`. The model stays in eval mode while the iterator is alive (restored when it is
    exhausted or closed); inference mode is entered per step, not across `yield`s.
    """
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise LMError(f"stream_generate takes one prompt, got a batch of {input_ids.shape[0]}.")
        row = input_ids.reshape(-1).tolist()
    else:
        row = list(input_ids)
    options = SamplingOptions.resolve(options, **overrides)
    rows = _prepare_rows(model, [row], options.max_new_tokens, options.truncate)
    gen = _make_generator(options.seed, generator, next(model.parameters()).device)
    with _eval_mode(model):
        for tokens, _ in _token_steps(model, rows, options, eos_id=eos_id, generator=gen, use_cache=use_cache,
                                      per_step_inference_mode=True):
            yield int(tokens[0])


# ----------------------------------------------------------------------------------- text API
class _TextAssembler:
    """Turns one row's new token ids into text pieces that are safe to show.

    - Bytes go through an incremental UTF-8 decoder: a byte-level BPE token may end in the middle of
      a multi-byte character, whose bytes are held until the character is complete, so a piece never
      holds half a character (or a U+FFFD in its place). Bytes that are invalid UTF-8 in any order
      still become U+FFFD; an incomplete character left at the very end is dropped.
    - Stop strings: the text is cut before the first occurrence of any of them. Text that could still
      grow into a stop string (a suffix that is a prefix of one) is held back until it cannot.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Optional[Sequence[str]]):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that became safe to emit (maybe ""). Sets `stopped`."""
        if self.stopped:
            return ""
        if token_id == self.tokenizer.eot_id:
            return self.finish()
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        # A stop string cannot start inside emitted text (see `_held_back`), so search after it.
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_until(min(hits))
        return self._emit_until(len(self.text) - self._held_back())

    def finish(self) -> str:
        """No more tokens: release what was held back for a stop string that never completed."""
        if self.stopped:  # already cut at a stop string (or finished): nothing more to release
            return ""
        self.stopped = True
        return self._emit_until(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop string."""
        pending = len(self.text) - self.emitted
        for k in range(min(pending, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            suffix = self.text[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _emit_until(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


def generate_text(model: nn.Module, tokenizer: TextTokenizer, prompts: Sequence[str],
                  options: Optional[SamplingOptions] = None, *, generator: Optional[torch.Generator] = None,
                  **overrides: Any) -> list[str]:
    """Completions (the new text only, without the prompt) for a batch of text prompts.

    `options` / `**overrides` as in `generate`. A completion ends at the tokenizer's end-of-text id
    (`tokenizer.eot_id`, not included), before the first `options.stop` string (not included), or after
    `max_new_tokens` tokens. Rows run as one left-padded
    batch; a row that stopped is masked until all are done. The result equals the concatenation of
    `stream_text`'s pieces for the same prompt and seed when the batch has one prompt (with several,
    sampling draws differ from one-at-a-time: the random stream is shared by the batch).
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text takes a list of prompts; use [prompt] for one.")
    options = SamplingOptions.resolve(options, **overrides)
    rows = _prepare_rows(model, [tokenizer.encode(p) for p in prompts], options.max_new_tokens, options.truncate)
    gen = _make_generator(options.seed, generator, next(model.parameters()).device)
    assemblers = [_TextAssembler(tokenizer, options.stop) for _ in rows]
    pieces: list[list[str]] = [[] for _ in rows]
    with _eval_mode(model), torch.inference_mode():
        for tokens, finished in _token_steps(model, rows, options, eos_id=tokenizer.eot_id, generator=gen,
                                             use_cache=True, per_step_inference_mode=False):
            for i, token in enumerate(tokens.tolist()):
                if not assemblers[i].stopped:
                    pieces[i].append(assemblers[i].feed(token))
                    if assemblers[i].stopped:
                        finished[i] = True  # a stop string ends this row like eos would
    for i, assembler in enumerate(assemblers):
        pieces[i].append(assembler.finish())
    return ["".join(p) for p in pieces]


def stream_text(model: nn.Module, tokenizer: TextTokenizer, prompt: str, options: Optional[SamplingOptions] = None,
                *, generator: Optional[torch.Generator] = None, **overrides: Any) -> Iterator[str]:
    """Yield the completion of one prompt as non-empty text pieces, as soon as they are safe to show.

    Never yields half a UTF-8 character, nor text that might turn out to be the start of a stop
    string (it is yielded once it cannot be). Stops like `generate_text`; "".join of the pieces
    equals `generate_text(model, tokenizer, [prompt], ...)[0]` for the same seed.
    """
    options = SamplingOptions.resolve(options, **overrides)
    assembler = _TextAssembler(tokenizer, options.stop)
    for token in stream_generate(model, tokenizer.encode(prompt), options, eos_id=tokenizer.eot_id,
                                 generator=generator):
        piece = assembler.feed(token)
        if piece:
            yield piece
        if assembler.stopped:
            return
    piece = assembler.finish()
    if piece:
        yield piece
