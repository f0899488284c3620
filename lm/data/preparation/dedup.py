"""Duplicate removal for streamed documents: exact (hash set) and near (MinHash-LSH, datasketch).

A repeated document is memorized rather than learned, and inflates validation scores if it leaks
across a split boundary. Both deduplicators see documents one at a time and keep the first of a
group: memory holds a digest (exact) or a MinHash signature in the LSH index (near), never the text.

Near duplicates: a document is the set of its word n-grams (``near_dedup_ngram`` words, lowercased);
two documents whose sets have a Jaccard similarity of about ``near_dedup_threshold`` or more are near
duplicates (the same article with a changed date, a mirrored page with another footer). MinHash
estimates the Jaccard similarity from ``num_perm`` minimum hashes, and LSH (banding) finds candidate
matches without comparing all pairs. Both come from datasketch (maintained, widely used for corpus
deduplication); shingles are hashed here in numpy (:func:`word_hashes`), several times faster than
hashing every n-gram string in Python with datasketch's default SHA-1.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from lm.extras import require

if TYPE_CHECKING:
    from lm.data.preparation.clean import CleaningOptions

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: mixes word order into n-gram hashes
_INVERSE = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
_LOW32 = np.uint64(0xFFFFFFFF)
_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)


def _identity(value: int) -> int:
    return value  # shingles arrive already hashed (see NearDeduplicator.shingle_hashes)


def word_hashes(data: bytes) -> np.ndarray:
    """64-bit polynomial hash of every whitespace-separated word of ``data``, all words at once in numpy.

    With prefix sums ``C[i] = sum_{k<=i} b[k] * P^-k`` (mod 2**64; P is odd, so invertible), the hash
    ``sum_k b[k] * P^(e-1-k)`` of bytes ``[s, e)`` is ``P^(e-1) * (C[e-1] - C[s-1])``: no Python loop
    per word, deterministic across runs (unlike ``hash(str)``).
    """
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers, inverse = _powers(_MULTIPLIER, b.size), _powers(_INVERSE, b.size)
        prefix = np.cumsum((b.astype(np.uint64) + np.uint64(1)) * inverse)
    is_space = np.isin(b, _WHITESPACE)
    edges = np.flatnonzero(np.diff(np.concatenate(([True], is_space, [True])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]  # [start, end) of every word
    before = np.where(starts > 0, prefix[np.maximum(starts - 1, 0)], np.uint64(0))
    with np.errstate(over="ignore"):
        return powers[ends - 1] * (prefix[ends - 1] - before)


def _powers(base: np.uint64, size: int) -> np.ndarray:
    """``base**k`` for k in [0, size), wrapping modulo 2**64."""
    factors = np.full(size, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors)


class ExactDeduplicator:
    """Remembers a 16-byte BLAKE2 digest of every document kept so far."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()

    def seen(self, text: str) -> bool:
        """True if ``text`` was seen before; otherwise remember it and return False."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False


class NearDeduplicator:
    """MinHash-LSH over word n-gram shingles (datasketch): drops a document close to a kept one."""

    def __init__(self, options: CleaningOptions) -> None:
        (datasketch,) = require("data", "cleaning.near_dedup", ("datasketch",))
        MinHash, MinHashLSH = datasketch.MinHash, datasketch.MinHashLSH
        self._minhash = MinHash
        self.num_perm = options.near_dedup_num_perm
        self.ngram = options.near_dedup_ngram
        self._lsh = MinHashLSH(threshold=options.near_dedup_threshold, num_perm=self.num_perm)
        self._template = MinHash(num_perm=self.num_perm, seed=1)  # its permutations are shared by all
        self._count = 0

    def shingle_hashes(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the document's word n-grams (the whole document if shorter)."""
        words = word_hashes(text.lower().encode("utf-8"))
        if len(words) == 0:
            words = np.zeros(1, dtype=np.uint64)
        n = min(self.ngram, len(words))
        count = len(words) - n + 1
        combined = np.zeros(count, dtype=np.uint64)
        for j in range(n):  # an n-gram's hash is a polynomial of its word hashes (wrapping mod 2**64)
            combined = combined * _MULTIPLIER + words[j : j + count]
        return np.unique(((combined >> np.uint64(32)) ^ combined) & _LOW32)

    def signature(self, text: str) -> Any:
        """The datasketch ``MinHash`` of the document's shingles."""
        minhash = self._minhash(num_perm=self.num_perm, hashfunc=_identity, permutations=self._template.permutations,
                                scheme=self._template.scheme)  # fmt: skip
        minhash.update_batch(self.shingle_hashes(text).tolist())
        return minhash

    def seen(self, text: str) -> bool:
        """True if a kept document is a near duplicate of ``text``; otherwise index ``text`` and return False."""
        minhash = self.signature(text)
        if self._lsh.query(minhash):
            return True
        self._lsh.insert(self._count, minhash, check_duplication=False)
        self._count += 1
        return False
