"""Training and evaluation windows over a token stream, the samplers that split them across ranks, and
the training loader whose position inside an epoch goes into checkpoints.

The token stream is anything 1-D and sliceable: a ``numpy`` array, a memmap, or the shards of a
prepared split (:class:`lm.data.token_cache.TokenShards`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lm.errors import LMError
from lm.evaluation.token_losses import IGNORE_INDEX  # noqa: F401  (targets the loss skips; re-exported for lm.data)

logger = logging.getLogger("lm.data")


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
    worker keeps one copy in the page cache however many workers and processes read it. (The shards
    of a prepared split, ``TokenShards``, pickle as their file names by themselves.)
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


def check_token_count(num_tokens: int, block_size: int, split: str, source: str = "") -> None:
    """The one "too few tokens" check: a training split needs one window plus a target, others 2 tokens."""
    if block_size < 1:
        raise LMError(f"block_size must be >= 1, got {block_size}")
    minimum = block_size + 1 if split in ("train", "training") else 2
    if num_tokens < minimum:
        where = f"; source: {source}" if source else ""
        raise LMError(
            f"The {split} split has {num_tokens} tokens, too few for block_size={block_size} "
            f"(need at least {minimum}{where}). Use more text or shorter windows (under lm fit: a smaller "
            f"--model.config.max_position_embeddings, the context data.block_size is set from)."
        )


def _check_tokens(tokens: Any, block_size: int, split: str) -> None:
    if getattr(tokens, "ndim", 1) != 1:
        raise LMError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    check_token_count(len(tokens), block_size, split)


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
        _check_tokens(tokens, block_size, "training")
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
        return h % (len(self.tokens_for(epoch)) - self.block_size)

    def tokens_for(self, epoch: int) -> Any:
        """The token stream the windows of ``epoch`` are cut from (always the same one here)."""
        return self.tokens

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        epoch = self.epoch  # read once: the start and the stream must belong to the same epoch
        start = self.window_start(index, epoch)
        tokens = self.tokens_for(epoch)
        window = torch.from_numpy(tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class VariantWindowDataset(RandomWindowDataset):
    """:class:`RandomWindowDataset` over several encodings of the same text, one per epoch.

    Epoch ``e`` cuts its windows from ``variants[e % K]`` (e.g. the BPE-dropout segmentations of the
    training split, lm/data/preparation/dropout_variants.py), starting at ``hash(seed, e, i) mod
    (len(variant) - block_size)`` as in the parent. The variant is a function of the epoch alone, so
    ``set_epoch`` (and hence a resumed run, which sets the checkpoint's epoch) selects it, in the main
    process and in persistent workers alike. ``num_samples`` is chosen by the caller (the DataModule keeps
    the canonical split's count, so an epoch is the same number of windows with and without variants).
    """

    def __init__(self, variants: list[Any], block_size: int, num_samples: int, seed: int = 0) -> None:
        if not variants:
            raise LMError("VariantWindowDataset needs at least one token stream.")
        for tokens in variants:
            _check_tokens(tokens, block_size, "training")
        super().__init__(variants[0], block_size, num_samples, seed)
        self.variants = list(variants)

    def tokens_for(self, epoch: int) -> Any:
        return self.variants[epoch % len(self.variants)]


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
        _check_tokens(tokens, block_size, "evaluation")
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
