"""Autoregressive generation for `GPT`: token level (`generate`, `stream_generate`) and text level
(`generate_text`, `stream_text`). No Lightning here, so the CLI, a server or a notebook can all use it.

How a call runs (each job in its own file):
- the prompts are checked against the context (`fit_prompts`, lm/model/decoder.py);
- they are prefilled together into a `Decoder` (lm/model/decoder.py), left-padded to one length with
  position ids and an attention mask that hide the padding, so every row is computed exactly as if it
  were alone in the batch; then one token per step, each step attending to the KV cache
  (`use_cache=False` re-runs the whole sequence instead: a reference and a benchmark baseline);
- the next token is greedy (`temperature=0`) or sampled with temperature / top-k / top-p, all read from
  one `SamplingOptions` (lm/model/sampling.py; or keyword overrides of its fields:
  `generate(model, ids, temperature=0)`);
- a row stops at `eos_id` (text level: the tokenizer's end-of-text id or a stop string, found by a
  `TextAssembler`, lm/model/text_stream.py); the loop ends when every row stopped or after `max_new_tokens`.

Context length policy: the prompt plus `max_new_tokens` must fit in `max_position_embeddings`.
Otherwise `ValueError`, unless `truncate=True`, which keeps only the last
`max_position_embeddings - max_new_tokens` prompt tokens (left truncation). Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lm.errors import LMError
from lm.model.decoder import Decoder, Prompts, fit_prompts
from lm.model.sampling import (SamplingOptions, filter_logits, recent_tokens, sample_next_token,
                               sampling_generator, with_latest)
from lm.model.text_stream import TextAssembler, TextTokenizer

# SamplingOptions, filter_logits and sample_next_token live in lm/model/sampling.py; importable from here too.
__all__ = ["generate", "stream_generate", "generate_text", "stream_text", "SamplingOptions", "filter_logits",
           "sample_next_token"]


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

    All rows join one `Decoder` together and stay to the end (a finished row is fed `eos_id`), so the
    batch keeps its shape and its shared random stream is drawn the same way every step. A row that produced `eos_id` is finished; its later tokens are `eos_id` again (padding). The
    caller may also finish rows itself (stop strings) by setting `finished[i] = True` in place.
    The caller must run this under eval mode. For streaming, `per_step_inference_mode` enters
    inference mode around each step only, so the caller's code between steps is not affected.
    """
    mode = torch.inference_mode if per_step_inference_mode else contextlib.nullcontext
    max_new_tokens = options.max_new_tokens
    if max_new_tokens == 0:
        return
    with mode():
        decoder = Decoder(model, capacity=len(rows), max_length=max(len(row) for row in rows) + max_new_tokens,
                          context_cache=options.context_cache, use_cache=use_cache)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=decoder.device)
        logits = decoder.admit(rows)
        recent = recent_tokens(rows, options.repetition_window, decoder.device)  # for the repetition penalty
    for step in range(max_new_tokens):
        with mode():
            tokens = sample_next_token(logits, options, generator, recent)
            recent = with_latest(recent, tokens)
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
    rows = fit_prompts(input_ids, model.config.max_position_embeddings, options.max_new_tokens,
                       options.truncate)
    device = next(model.parameters()).device
    gen = sampling_generator(options.seed, generator, device)
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
    rows = fit_prompts([row], model.config.max_position_embeddings, options.max_new_tokens, options.truncate)
    gen = sampling_generator(options.seed, generator, next(model.parameters()).device)
    with _eval_mode(model):
        for tokens, _ in _token_steps(model, rows, options, eos_id=eos_id, generator=gen, use_cache=use_cache,
                                      per_step_inference_mode=True):
            yield int(tokens[0])


# ----------------------------------------------------------------------------------- text API
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
    rows = fit_prompts([tokenizer.encode(p) for p in prompts], model.config.max_position_embeddings,
                       options.max_new_tokens, options.truncate)
    gen = sampling_generator(options.seed, generator, next(model.parameters()).device)
    assemblers = [TextAssembler(tokenizer, options.stop) for _ in rows]
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
    assembler = TextAssembler(tokenizer, options.stop)
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
