"""Tokenizing a stream of documents into token shards: batched, optionally multi-process, with progress.

Documents arrive as ``(text, ends_document)`` pieces and leave as ids followed by ``<|endoftext|>``
where a document ends. Long documents are encoded in line-aligned pieces (one multi-megabyte string
would run on one core and hold all its ids at once); decoding is unaffected, only merges across a
piece boundary may differ.

Encoder: for the default byte-level BPE, ``tiktoken`` built from the tokenizer's own merges (faster per
core than HF: it works on byte slices, not a string object per token), used only after it gave HF's exact
ids on the corpus's first batch (the equivalence argument is in lm/data/preparation/fast_bpe.py); otherwise,
and for the other tokenizer kinds, HF ``tokenizers``. The measured speeds are in docs/data.md.

Where the time goes in HF (``perf`` on the tokenizer alone): the ``tokenizers`` encoder itself, and in it
more than half of the cycles in ``malloc``/``free`` (a ``String`` per token, a
``NormalizedString`` per word). The Python side around it (ids into one numpy array, shards written
from it) costs a few percent. So the speed comes from running the Rust encoder on every core
without oversubscribing them, and from a faster allocator in the worker processes:

* ``num_proc == 1`` encodes in this process: with HF, ``encode_batch`` lets the Rust backend spread
  each batch of documents (about 1 MB of text per core) over all usable cores; the tiktoken fast path
  runs on one thread and still outpaces HF on two cores (docs/data.md); ``num_proc > 1`` spreads it.
* ``num_proc > 1`` starts that many worker processes (spawned) and gives each
  ``cores // num_proc`` Rust threads (one each when there are as many workers as cores), sends them
  batches of about ``BATCH_CHARS`` characters and writes the results in order. At most
  ``4 * num_proc`` batches are in flight, so memory stays bounded whatever the corpus size; batches
  of about 1 MB keep every worker busy to the end even on a small corpus.
* Workers run with mimalloc preloaded when it is installed (the ``cmeel-mimalloc`` package, in
  the ``data`` extra on x86-64 Linux, or a system ``libmimalloc``), since the encoder's many small
  allocations are where glibc's allocator is slow. ``LM_ENCODE_MALLOC`` overrides: ``system`` keeps the C library's
  allocator, a path preloads that library (lm/runtime/allocator.py). The allocator changes speed only, never
  the ids.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lm.runtime.allocator import fast_allocator
from lm.data.preparation.fast_bpe import BatchEncoder, fast_encoder
from lm.data.tokenizer import Tokenizer
from lm.runtime.hardware import usable_cpus

if TYPE_CHECKING:  # numpy is imported where the shards are written, not in the workers (half their start-up)
    import numpy as np

    from lm.data.token_cache import ShardWriter

logger = logging.getLogger("lm.data")
BATCH_CHARS = 1 << 18  # text per task sent to a worker; in-process batches hold 4x this per core
MAX_PIECE_CHARS = 1 << 20  # longer documents are encoded in line-aligned pieces of about this size

_Piece = tuple[str, bool]


@dataclass
class EncodeCounts:
    num_tokens: int = 0
    num_bytes: int = 0  # UTF-8 bytes of the encoded text (the bits-per-byte denominator)


def split_long(pieces: Iterable[_Piece], max_chars: int = MAX_PIECE_CHARS) -> Iterator[_Piece]:
    """Cut texts longer than ``max_chars`` at line breaks; only the last piece keeps ``ends_document``."""
    for text, ends_doc in pieces:
        start = 0
        while len(text) - start > max_chars:
            cut = text.rfind("\n", start, start + max_chars)
            cut = start + max_chars if cut <= start else cut + 1
            yield text[start:cut], False
            start = cut
        yield text[start:], ends_doc


def batches(pieces: Iterable[_Piece], batch_chars: int = BATCH_CHARS) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    size = 0
    for piece in split_long(pieces):
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batch(
    tokenizer: Tokenizer, batch: list[_Piece], typecode: str, fast: BatchEncoder | None = None
) -> tuple[array, int]:
    """Ids of a batch (end-of-text after each finished document) in one flat ``array`` of ``typecode``
    (``numpy.dtype.char``: ``H`` uint16, ``I`` uint32), and the batch's UTF-8 byte count.
    ``fast``: a verified exact encoder (lm/data/preparation/fast_bpe.py) used instead of ``tokenizer``'s own."""
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    flat = array(typecode)
    for (_, ends_doc), ids in zip(batch, (fast or tokenizer).encode_batch([text for text, _ in batch])):
        flat.fromlist(ids)
        if ends_doc:
            flat.fromlist(eot)
    return flat, sum(len(text) if text.isascii() else len(text.encode("utf-8")) for text, _ in batch)


_worker_tokenizer: Tokenizer | None = None
_worker_fast: BatchEncoder | None = None
_worker_typecode = ""


def _init_worker(tokenizer_json: str, typecode: str, use_fast: bool) -> None:
    global _worker_tokenizer, _worker_typecode, _worker_fast
    _worker_tokenizer, _worker_typecode = Tokenizer.from_str(tokenizer_json), typecode
    _worker_fast = fast_encoder(_worker_tokenizer) if use_fast else None


def _encode_in_worker(batch: list[_Piece]) -> tuple[array, int]:
    assert _worker_tokenizer is not None
    return encode_batch(_worker_tokenizer, batch, _worker_typecode, _worker_fast)


def verified_fast_encoder(tokenizer: Tokenizer, sample: list[_Piece]) -> BatchEncoder | None:
    """The tiktoken fast path when it exists for ``tokenizer`` and gives HF's ids on ``sample``, else None."""
    fast = fast_encoder(tokenizer)
    if fast is None:
        return None
    texts = list(itertools.islice(_up_to(sample, BATCH_CHARS), 10_000))  # a HF check of ~1/4 MB
    if fast.encode_batch(texts) != tokenizer.encode_batch(texts):
        logger.warning("tiktoken fast path disagrees with HF tokenizers on the first batch: encoding with HF")
        return None
    return fast


def _up_to(sample: list[_Piece], chars: int) -> Iterator[str]:
    for text, _ in sample:
        yield text
        chars -= len(text)
        if chars <= 0:
            return


def encode_to_shards(
    pieces: Iterable[_Piece], tokenizer: Tokenizer, writer: ShardWriter, *, num_proc: int = 1,
    total_chars: int | None = None, description: str = "encode",
) -> EncodeCounts:  # fmt: skip
    """Encode ``pieces`` in order into ``writer``; returns token and byte counts."""
    import numpy as np
    from tqdm.auto import tqdm  # installed with lightning; hidden when not on a terminal

    counts = EncodeCounts()
    progress = tqdm(total=total_chars, unit="char", unit_scale=True, desc=description, disable=None, leave=False)
    with progress:
        # In this process a batch needs a piece per core for the Rust threads to share it out.
        stream = batches(pieces, BATCH_CHARS if num_proc > 1 else 4 * BATCH_CHARS * usable_cpus())
        first = next(stream, None)
        fast = None if first is None else verified_fast_encoder(tokenizer, first)
        stream = itertools.chain([] if first is None else [first], stream)
        for batch, (flat, num_bytes) in _encoded(stream, tokenizer, writer.dtype.char, num_proc, fast):
            ids = np.frombuffer(flat, dtype=writer.dtype)  # a view: the ids are not copied
            writer.write(ids)
            counts.num_tokens += int(ids.size)
            counts.num_bytes += num_bytes
            progress.update(sum(len(text) for text, _ in batch))
    return counts


def _encoded(
    stream: Iterator[list[_Piece]], tokenizer: Tokenizer, typecode: str, num_proc: int, fast: BatchEncoder | None
) -> Iterator[tuple[list[_Piece], tuple[array, int]]]:
    if num_proc <= 1:
        for batch in stream:
            yield batch, encode_batch(tokenizer, batch, typecode, fast)
        return
    # Spawned (not forked) workers: a fork after the Rust thread pool ran can deadlock it.
    context = multiprocessing.get_context("spawn")
    with _environment(worker_environment(num_proc)):  # read by the workers as they start
        pool = context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(), typecode, fast is not None))
    with pool:
        pending: list[tuple[list[_Piece], object]] = []
        for batch in stream:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 4 * num_proc:
                done_batch, result = pending.pop(0)
                yield done_batch, result.get()  # type: ignore[attr-defined]
        for done_batch, result in pending:
            yield done_batch, result.get()  # type: ignore[attr-defined]


def worker_environment(num_proc: int) -> dict[str, str]:
    """Environment of the encode workers: Rust threads that share the cores out, and the allocator."""
    threads = max(1, usable_cpus() // num_proc)
    env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}
    allocator = fast_allocator()
    if allocator:
        env["LD_PRELOAD"] = " ".join(filter(None, [allocator, os.environ.get("LD_PRELOAD", "")]))
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
