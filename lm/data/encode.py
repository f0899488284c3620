"""Tokenizing a stream of documents into token shards: batched, optionally multi-process, with progress.

Documents arrive as ``(text, ends_document)`` pieces and leave as ids followed by ``<|endoftext|>``
where a document ends. Long documents are encoded in line-aligned pieces (one multi-megabyte string
would run on one core and hold all its ids at once); decoding is unaffected, only merges across a
piece boundary may differ.

``num_proc == 1`` encodes in this process with ``encode_batch`` (the Rust backend spreads a batch
over threads). ``num_proc > 1`` starts that many worker processes (spawned, each single-threaded),
sends them batches of about ``batch_chars`` characters and writes the results in order; at most
``2 * num_proc`` batches are in flight, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from lm.data.cache import ShardWriter
from lm.data.tokenizer import Tokenizer

BATCH_CHARS = 4 << 20  # text per encode_batch call (and per task sent to a worker)
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


def encode_batch(tokenizer: Tokenizer, batch: list[_Piece], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Ids of a batch (end-of-text after each finished document) and its UTF-8 byte count."""
    eot = tokenizer.eot_id
    encoded = tokenizer.encode_batch([text for text, _ in batch])
    parts = []
    for (_, ends_doc), ids in zip(batch, encoded):
        parts.append(ids + [eot] if ends_doc and eot is not None else ids)
    flat = np.concatenate([np.array(ids, dtype=dtype) for ids in parts]) if parts else np.zeros(0, dtype=dtype)
    return flat, sum(len(text.encode("utf-8")) for text, _ in batch)


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer, _worker_dtype = Tokenizer.from_str(tokenizer_json), np.dtype(dtype)


def _encode_in_worker(batch: list[_Piece]) -> tuple[np.ndarray, int]:
    assert _worker_tokenizer is not None and _worker_dtype is not None
    return encode_batch(_worker_tokenizer, batch, _worker_dtype)


def encode_to_shards(
    pieces: Iterable[_Piece], tokenizer: Tokenizer, writer: ShardWriter, *, num_proc: int = 1,
    total_chars: int | None = None, description: str = "encode",
) -> EncodeCounts:  # fmt: skip
    """Encode ``pieces`` in order into ``writer``; returns token and byte counts."""
    from tqdm.auto import tqdm  # installed with lightning; hidden when not on a terminal

    counts = EncodeCounts()
    progress = tqdm(total=total_chars, unit="char", unit_scale=True, desc=description, disable=None, leave=False)
    with progress:
        for batch, (ids, num_bytes) in _encoded(batches(pieces), tokenizer, writer.dtype, num_proc):
            writer.write(ids)
            counts.num_tokens += int(ids.size)
            counts.num_bytes += num_bytes
            progress.update(sum(len(text) for text, _ in batch))
    return counts


def _encoded(
    stream: Iterator[list[_Piece]], tokenizer: Tokenizer, dtype: np.dtype, num_proc: int
) -> Iterator[tuple[list[_Piece], tuple[np.ndarray, int]]]:
    if num_proc <= 1:
        for batch in stream:
            yield batch, encode_batch(tokenizer, batch, dtype)
        return
    # Spawned (not forked) workers: a fork after the Rust thread pool ran can deadlock it.
    context = multiprocessing.get_context("spawn")
    env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    try:
        with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(), dtype.str)) as pool:
            pending: list[tuple[list[_Piece], object]] = []
            for batch in stream:
                pending.append((batch, pool.apply_async(_encode_in_worker, (batch,))))
                if len(pending) >= 2 * num_proc:
                    done_batch, result = pending.pop(0)
                    yield done_batch, result.get()  # type: ignore[attr-defined]
            for done_batch, result in pending:
                yield done_batch, result.get()  # type: ignore[attr-defined]
    finally:
        if env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env
