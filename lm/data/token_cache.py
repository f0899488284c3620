"""The sharded token cache: bounded shard files plus a manifest that is the commit point.

Layout of one prepared split, under ``cache_dir/tokens/<split>-<key>/``::

    shard-00000.bin ...   flat token ids (uint16 when the vocabulary fits, else uint32), each at
                          most ``shard_tokens`` long, so no file (and no write buffer) grows unbounded
    manifest.json         written last, atomically: shards with their sizes, token/byte/document
                          counts, the source fingerprint, cleaning options, tokenizer hash, report

``key`` hashes everything that determines the ids, so a stale cache is never read. A build first
deletes the folder's manifest, then its shards, and writes the new manifest only after every shard is
on disk: a prepare killed at any point leaves a folder without a (valid) manifest, which the next run
rebuilds instead of trusting. A manifest whose shard sizes don't match the files is rejected too.

:class:`TokenShards` reads the shards as one read-only sequence of memory maps: the OS pages ids in
on demand and shares them between DataLoader workers and DDP processes, so a dataset larger than RAM
costs nothing to "load".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lm.io.files import atomic_write_text, describe_holder, release_lock, wait_lock

logger = logging.getLogger("lm.data")

CACHE_VERSION = 2
"""Bump when the on-disk format or the pipeline changes: invalidates every cache."""

MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M ids: 256 MB per uint16 shard


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 halves disk and page-cache use for vocab <= 65536."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_key(payload: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able description of everything that determines a cached artifact."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ShardWriter:
    """Appends token ids to ``shard-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while ids.size:
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(ids.size, self.shard_tokens - self._in_shard)
            ids[:take].tofile(self._file)
            self._in_shard += take
            self.shards[-1]["num_tokens"] = self._in_shard
            ids = ids[take:]

    def _open_next(self) -> None:
        self._close_current()
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 (closed in _close_current)
        self._in_shard = 0
        self.shards.append({"file": name, "num_tokens": 0})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        """Flush to disk; returns the shard list for the manifest."""
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextmanager
def cache_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold the lock `cache_dir/.locks/<name>.lock` (one per cache key: a tokenizer, a split, a chunk folder)
    while building what it names; if another process holds it, log that this one waits for it, and wait."""
    path = cache_dir / ".locks" / f"{name}.lock"

    def waiting(holder: dict[str, Any]) -> None:
        logger.info("Another process (%s) is preparing the same data (%s) in %s: waiting for it to finish, "
                    "then using what it wrote ...", describe_holder(holder), name, cache_dir)

    fd = wait_lock(path, on_wait=waiting)
    try:
        yield
    finally:
        release_lock(fd)


def start_build(folder: Path) -> None:
    """Make ``folder`` an empty build folder: the old manifest goes first, so nothing half-built is trusted."""
    (folder / MANIFEST).unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def commit(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last and atomically: from now on the split is prepared."""
    manifest = {**manifest, "cache_version": CACHE_VERSION}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a completely written split, or None (missing, unreadable, or shards that disagree)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        itemsize = np.dtype(manifest["dtype"]).itemsize
        shards = [(folder / s["file"], int(s["num_tokens"])) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("Ignoring unreadable token cache manifest %s", path)
        return None
    for file, num_tokens in shards:
        if not file.is_file() or file.stat().st_size != num_tokens * itemsize:
            logger.warning("Ignoring token cache %s: %s is missing or its size disagrees with the manifest", folder, file)
            return None
    return manifest


class TokenShards:
    """The shards of a split as one read-only 1-D sequence of token ids (memory maps, opened lazily).

    Supports ``len``, integer and slice indexing (a slice may cross shard boundaries), ``dtype``,
    ``np.asarray`` and ``tolist``. Pickles as its file names (DataLoader workers reopen the maps
    instead of copying the tokens).
    """

    ndim = 1

    def __init__(self, files: list[Path], lengths: list[int], dtype: np.dtype) -> None:
        self.files, self.lengths, self.dtype = [Path(f) for f in files], list(lengths), np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self._maps: list[np.ndarray] | None = None

    @classmethod
    def open(cls, folder: Path, manifest: dict[str, Any]) -> TokenShards:
        shards = [s for s in manifest["shards"] if s["num_tokens"] > 0]
        return cls([folder / s["file"] for s in shards], [s["num_tokens"] for s in shards], manifest["dtype"])

    def _shard_maps(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) for f, n in zip(self.files, self.lengths)]
        return self._maps

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenShards supports contiguous slices only")
            return self._read(start, max(start, stop))
        index = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tokens")
        return self._read(index, index + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        maps = self._shard_maps()
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop and first < len(maps):
            base = int(self.offsets[first])
            end = min(stop, int(self.offsets[first + 1]))
            pieces.append(maps[first][start - base : end - base])
            start, first = end, first + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[:]
        return np.array(array, dtype=dtype) if dtype is not None else np.array(array)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}
