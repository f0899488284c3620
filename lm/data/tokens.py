"""Token cache (tokenize once, memory-map forever) and the datasets that cut it into training windows.

Cache layout, under ``cache_dir``::

    tokens/<split>-<key>.bin    flat array of token ids (uint16 if the vocabulary fits, else uint32)
    tokens/<split>-<key>.json   metadata: num_tokens, dtype, num_bytes of text, source, ...

``key`` hashes everything that determines the ids (see ``TextDataModule``), so a stale cache is never
read. Both files are written to a temporary name and ``os.replace``-d into place, the ``.bin`` first
and the ``.json`` last: the metadata file is the commit marker, and a ``.bin`` is only used when its
metadata exists and its size agrees with it. A run killed mid-write leaves at most a stray
``.*.tmp`` file that nothing reads.

Why memmaps: the OS pages token ids in on demand and shares them between DataLoader workers and DDP
processes, so a dataset larger than RAM costs nothing to "load".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lm.data.tokenizer import Tokenizer, atomic_write_text
from lm.errors import LMError

logger = logging.getLogger("lm.data")

CACHE_VERSION = 1
"""Bump when the on-disk format or the tokenization pipeline changes: invalidates every cache."""

IGNORE_INDEX = -100
"""Target value that ``torch.nn.functional.cross_entropy`` skips (its default ``ignore_index``)."""

_ENCODE_BATCH_CHARS = 4 << 20  # text per encode_batch call: bounds memory, keeps both cores busy
_MAX_PIECE_CHARS = 1 << 20  # longer documents are encoded in line-aligned pieces of about this size


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 halves disk and page-cache use for vocab <= 65536."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_key(payload: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able description of everything that determines a cached artifact."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- cache files


def load_cached_tokens(bin_path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Memory-map a cached token file, or return None if it is missing or inconsistent with its metadata."""
    meta_path = bin_path.with_suffix(".json")
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        num_tokens = int(meta["num_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("Ignoring unreadable token cache metadata %s", meta_path)
        return None
    if bin_path.stat().st_size != num_tokens * dtype.itemsize:
        logger.warning("Ignoring token cache %s: size does not match its metadata", bin_path)
        return None
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)), meta


def _pieces(documents: Sequence[str], eot_after_last: bool) -> Iterator[tuple[str, bool]]:
    """Yield (text, end_of_document) pieces; long documents are split at line breaks.

    Encoding a multi-megabyte string in one call runs on one core and holds all its ids at once;
    line-aligned pieces bound memory and let ``encode_batch`` use every core. Decoding is unaffected
    (byte-level BPE is lossless either way); only the merges across a piece boundary may differ.
    """
    for d, doc in enumerate(documents):
        is_last = d == len(documents) - 1
        start = 0
        while len(doc) - start > _MAX_PIECE_CHARS:
            cut = doc.rfind("\n", start, start + _MAX_PIECE_CHARS)
            cut = start + _MAX_PIECE_CHARS if cut <= start else cut + 1
            yield doc[start:cut], False
            start = cut
        yield doc[start:], (eot_after_last or not is_last)


def write_token_cache(
    bin_path: Path,
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    eot_after_last: bool = True,
    meta: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Tokenize ``documents`` (each followed by ``<|endoftext|>``) into ``bin_path`` atomically.

    Args:
        bin_path: destination ``.bin``; its metadata goes next to it as ``.json``.
        documents: cleaned documents, in order.
        tokenizer: the tokenizer.
        eot_after_last: put an end-of-text token after the last document too. False when the last
            "document" is the first half of an article whose second half is in another split.
        meta: extra metadata to record (source description, cache key, ...).

    Returns:
        The memory-mapped tokens and their metadata.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    if eot is None:
        logger.warning("Tokenizer has no %r token: documents are concatenated without a separator.", "<|endoftext|>")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{bin_path.name}.", suffix=".tmp", dir=bin_path.parent)
    num_tokens = num_bytes = 0
    try:
        with os.fdopen(fd, "wb") as f:
            batch: list[tuple[str, bool]] = []
            batch_chars = 0

            def flush() -> None:
                nonlocal num_tokens, num_bytes, batch, batch_chars
                if not batch:
                    return
                encoded = tokenizer.encode_batch([text for text, _ in batch])
                for (text, ends_doc), ids in zip(batch, encoded):
                    if ends_doc and eot is not None:
                        ids.append(eot)
                    np.asarray(ids, dtype=dtype).tofile(f)
                    num_tokens += len(ids)
                    num_bytes += len(text.encode("utf-8"))
                batch, batch_chars = [], 0

            for piece in _pieces(documents, eot_after_last):
                batch.append(piece)
                batch_chars += len(piece[0])
                if batch_chars >= _ENCODE_BATCH_CHARS:
                    flush()
            flush()
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        **(meta or {}),
        "num_tokens": num_tokens,
        "dtype": dtype.name,
        "num_bytes": num_bytes,
        "num_documents": len(documents),
        "eot_id": eot,
        "vocab_size": tokenizer.vocab_size,
        "cache_version": CACHE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(bin_path.with_suffix(".json"), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    loaded = load_cached_tokens(bin_path)
    assert loaded is not None, f"token cache {bin_path} vanished right after writing it"
    return loaded


def get_or_build_tokens(
    bin_path: Path,
    split: str,
    tokenizer: Tokenizer,
    documents: Callable[[], tuple[list[str], bool]],
    meta: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return cached tokens for ``split``, tokenizing (and caching) them first on a miss.

    Args:
        bin_path: cache file named by the cache key.
        split: split name, for log messages.
        tokenizer: the tokenizer.
        documents: called only on a miss; returns ``(documents, eot_after_last)``.
        meta: extra metadata to record on a miss.
    """
    cached = load_cached_tokens(bin_path)
    if cached is not None:
        logger.info("Token cache hit: %s (%d tokens)", bin_path, cached[1]["num_tokens"])
        return cached
    source = (meta or {}).get("source", "")
    logger.info("Tokenizing %s (%s) ...", split, source)
    start = time.perf_counter()
    docs, eot_after_last = documents()
    tokens, info = write_token_cache(bin_path, docs, tokenizer, eot_after_last=eot_after_last, meta=meta)
    seconds = time.perf_counter() - start
    logger.info(
        "Tokenized %s: %d documents, %.2f MB -> %d tokens (%.2f bytes/token) in %.2f s -> %s",
        split, info["num_documents"], info["num_bytes"] / 1e6, info["num_tokens"],
        info["num_bytes"] / max(info["num_tokens"], 1), seconds, bin_path,
    )  # fmt: skip
    return tokens, info


# ---------------------------------------------------------------------- datasets


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a cheap, well-mixed 64-bit hash (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _TokenArrayState:
    """Pickling support shared by the datasets: a memmap travels to workers as its file name.

    Pickling an ``np.memmap`` copies the whole array into the pickle; re-opening the file in the
    worker keeps one copy in the page cache however many workers and processes read it.
    """

    tokens: np.ndarray

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        tokens = state["tokens"]
        if isinstance(tokens, np.memmap) and tokens.filename and tokens.offset == 0:
            if os.path.getsize(tokens.filename) == tokens.nbytes:  # a whole file, not a slice of one
                state["tokens"] = ("memmap", tokens.filename, tokens.dtype.str, len(tokens))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, length = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(length,))
        self.__dict__.update(state)


def _check_tokens(tokens: np.ndarray, block_size: int, minimum: int, what: str) -> None:
    if tokens.ndim != 1:
        raise LMError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if block_size < 1:
        raise LMError(f"block_size must be >= 1, got {block_size}")
    if len(tokens) < minimum:
        raise LMError(
            f"The {what} split has {len(tokens)} tokens, too few for block_size={block_size} "
            f"(need at least {minimum}). Use more text or a smaller --data.block_size."
        )


class RandomWindowDataset(_TokenArrayState, Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random contiguous windows of a token stream, nanoGPT-style, but map-style and reproducible.

    Item ``i`` is the window starting at ``hash(seed, epoch, i) mod (N - block_size)``: inputs are
    ``window[:-1]``, targets ``window[1:]``. Because the start is a pure function of
    ``(seed, epoch, i)`` rather than of a random generator's running state:

    * a run is reproducible, and a resumed run sees the same windows for the same (epoch, index);
    * data parallelism is exact: with ``DistributedSampler(shuffle=False)`` rank ``r`` of ``W`` gets
      indices ``r, r+W, ...``, disjoint across ranks, and 2 ranks with batch ``b`` see exactly the
      windows of 1 process with batch ``2b``;
    * no per-epoch index array has to be materialized, so ``num_samples`` can be huge.

    :meth:`set_epoch` selects a fresh set of windows. The epoch lives in a shared-memory tensor, so a
    call in the main process also reaches persistent DataLoader workers.

    Args:
        tokens: 1-D token ids (typically a read-only memmap).
        block_size: tokens per training example (the model's context length).
        num_samples: windows per epoch (the dataset length).
        seed: base seed; different seeds give independent window sequences.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, num_samples: int, seed: int = 0) -> None:
        _check_tokens(tokens, block_size, block_size + 1, "training")
        if num_samples < 1:
            raise LMError(f"num_samples must be >= 1, got {num_samples}")
        self.tokens = tokens
        self.block_size = block_size
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def window_start(self, index: int, epoch: int | None = None) -> int:
        """First token of window ``index`` in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        h = _mix64(_mix64(_mix64(self.seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
        return h % (len(self.tokens) - self.block_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        start = self.window_start(index)
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class SequentialWindowDataset(_TokenArrayState, Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows covering a token stream exactly once, for validation and test.

    Window ``k`` predicts tokens ``k*B+1 .. k*B+B`` from tokens ``k*B .. k*B+B-1``, so every token
    except the very first is a target exactly once, and a summed loss over the dataset is the loss of
    the whole split (the basis of exact perplexity and bits-per-byte). The last window is padded:
    inputs with ``pad_id``, targets with :data:`IGNORE_INDEX`. Index ``len(self)`` is an all-padding
    window (no targets): :class:`EvalDistributedSampler` uses it to give every rank the same number of
    batches without counting any window twice.

    Args:
        tokens: 1-D token ids.
        block_size: tokens per window.
        pad_id: input id used for padding the last window (its targets are ignored anyway).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, pad_id: int = 0) -> None:
        _check_tokens(tokens, block_size, 2, "evaluation")
        self.tokens = tokens
        self.block_size = block_size
        self.pad_id = pad_id

    @property
    def num_targets(self) -> int:
        """Number of non-ignored targets over the whole dataset."""
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return math.ceil(self.num_targets / self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == len(self):  # the filler window of EvalDistributedSampler
            inputs = torch.full((self.block_size,), self.pad_id, dtype=torch.int64)
            return inputs, torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.int64)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        start = index * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        inputs, targets = chunk[:-1], chunk[1:]
        pad = self.block_size - len(targets)
        if pad:
            inputs = torch.cat([inputs, inputs.new_full((pad,), self.pad_id)])
            targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
        return inputs, targets


class EvalDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``W`` evaluates windows ``r, r+W, ...``; ranks that come up short get the dataset's
    all-padding window (index ``len(dataset)``, every target ignored) instead of a repeated one.

    Lightning's injected ``DistributedSampler`` pads by repeating the first windows, which counts them
    twice in a multi-process validation loss; dropping them instead would give ranks unequal batch
    counts (a hang risk under DDP). With this one each rank runs the same number of batches and the
    token-weighted sums are those of the split, exactly. One process: all windows, in order.
    """

    def __init__(self, dataset: SequentialWindowDataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        filler = len(self.dataset)
        indices = list(range(self.rank, filler, self.num_replicas))
        return iter(indices + [filler] * (self.num_samples - len(indices)))


class EpochDistributedSampler(DistributedSampler):
    """``DistributedSampler(shuffle=False)`` that also forwards ``set_epoch`` to the dataset.

    Lightning calls ``set_epoch`` on the sampler at the start of every training epoch, but when it
    injects its own ``DistributedSampler`` (for a plain sequential sampler) that call never reaches
    the dataset, so random windows would repeat every epoch. Lightning leaves a sampler that already
    is a ``DistributedSampler`` alone, so the DataModule passes this one (with ``num_replicas=1`` in a
    single process): identical index assignment, plus fresh windows per epoch.
    """

    _skip = 0  # indices of this rank to skip once, on the next __iter__ (a resumed mid-epoch position)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(epoch)

    def skip_once(self, num_indices: int) -> None:
        """Make the next ``__iter__`` start ``num_indices`` into this rank's indices (then back to normal)."""
        self._skip = max(0, int(num_indices))

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        indices = super().__iter__()
        for _ in range(skip):
            next(indices, None)
        return indices


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` whose mid-epoch position goes into Lightning checkpoints.

    Lightning saves ``state_dict()`` of a train loader that has ``state_dict``/``load_state_dict``
    (its ``_Stateful`` protocol) under ``loops.fit_loop.state_dict.combined_loader``, and calls
    ``load_state_dict`` on resume before it creates the iterator. Without it a resumed run restarts the
    epoch from its first batch, i.e. trains twice on what it already saw.

    The position is the number of batches the *trainer* has consumed this epoch, read through
    ``progress_fn`` (set by the DataModule to Lightning's batch progress). Counting what the iterator
    yielded would be wrong: Lightning prefetches a batch ahead, and DataLoader workers several. Without
    ``progress_fn`` (a loop of your own) the yielded batches are counted.

    The state is stored as *global* samples consumed, so a run may resume on another number of
    processes: with ``W`` ranks, rank ``r`` takes indices ``r, r+W, ...``, and the first ``k*W`` global
    indices are exactly the first ``k`` of every rank. Requires an :class:`EpochDistributedSampler`.
    """

    progress_fn: Callable[[], int] | None = None
    _yielded = 0

    def __iter__(self):
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        consumed = self.progress_fn() if self.progress_fn is not None else self._yielded
        return {
            "epoch": int(getattr(sampler, "epoch", 0)),
            "batches_consumed": int(consumed),
            "samples_consumed": int(consumed) * int(self.batch_size or 1) * int(getattr(sampler, "num_replicas", 1)),
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochDistributedSampler):
            logger.warning("Cannot restore the data position: the training sampler is a %s.", type(sampler).__name__)
            return
        if state.get("num_samples") != len(self.dataset):
            logger.warning(
                "The training set changed since the checkpoint (%s samples per epoch, now %d): the resumed data "
                "position is approximate.", state.get("num_samples"), len(self.dataset),
            )
        epoch = int(state.get("epoch", 0))
        skip = int(state.get("samples_consumed", 0)) // sampler.num_replicas  # indices of this rank
        remaining = len(sampler) - skip
        if remaining <= 0 or (self.drop_last and remaining < (self.batch_size or 1)):
            epoch, skip = epoch + 1, 0  # saved at the end of an epoch: the next one starts afresh
        # Lightning creates the resumed iterator (and prefetches from it) before it calls set_epoch.
        sampler.set_epoch(epoch)
        sampler.skip_once(skip)
