"""BPE-dropout variants of the training split: the same text, re-segmented with random merges left out.

BPE-dropout (Provilkov et al., 2020, "BPE-Dropout: Simple and Effective Subword Regularization") skips
each merge with probability ``p`` while encoding, so a word is spelled in a different, longer
segmentation each time; a model trained on several segmentations of the same text sees each word
split in many ways, which may regularize when the data is small and read many times (measured on the
WikiText-2 quality protocol it did not: +0.8-1.5% test bpb, docs/results/quality.md "Round 2"). Validation and
test are never touched: they stay the canonical (deterministic) encoding, so losses and bits per byte
are those of the usual tokenization.

How a variant is made: the canonical training split (already in the token cache) is cut at its
``<|endoftext|>`` ids, each document is decoded back to its text (the byte-level tokenizers are
lossless, so this is the cleaned training text exactly, with no second read or cleaning of the
sources), and encoded again by HF ``tokenizers`` with ``model.dropout = p``, through the usual
:func:`~lm.data.preparation.encode.encode_to_shards` (batched, ``num_proc`` workers; the tiktoken fast
path refuses a tokenizer with dropout, so HF encodes). Each variant is a cache folder of its own
(``tokens/train-dropout-<key>/``, shards + manifest, built under its own lock like every split).

Not seedable: ``tokenizers`` (0.23) draws the dropout decisions from Rust's ``thread_rng`` (seeded
from the OS), and no API sets its seed. Reproducibility therefore comes from the cache: the variants
are encoded once and a run reads them from disk, so runs on the same cache (and a resumed run) see the
same segmentations. Re-preparing them (another machine, another ``cache_dir``, a deleted cache) draws
new ones: the same distribution, not the same ids. Copy the cache folders to repeat a run exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lm.data.token_cache import cache_key
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError

VARIANT_PREFIX = "train-dropout-"


def check_dropout_options(bpe_dropout: float, variants: int) -> None:
    """Clear errors for a dropout probability outside [0, 1) or fewer than one variant."""
    if not 0.0 <= bpe_dropout < 1.0:
        raise LMError(f"bpe_dropout must be in [0, 1) (the probability of skipping each merge), got {bpe_dropout}. "
                      "Use e.g. --data.bpe_dropout 0.1, or 0 to switch BPE-dropout off.")
    if variants < 1:
        raise LMError(f"bpe_dropout_variants must be >= 1 (training encodings, one per epoch in turn), got {variants}.")


def dropout_tokenizer(tokenizer: Tokenizer, bpe_dropout: float) -> Tokenizer:
    """A copy of ``tokenizer`` whose BPE model skips each merge with probability ``bpe_dropout``.

    Set through the JSON (``model.dropout``), so the worker processes of a multi-process encode, which
    rebuild the tokenizer from ``to_str()``, drop merges too."""
    spec = json.loads(tokenizer.to_str())
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE":
        raise LMError(f"bpe_dropout needs a BPE tokenizer, but this one is {model_type!r}: drop --data.bpe_dropout, "
                      "or use --data.tokenizer_kind bpe (or a BPE tokenizer.json).")
    spec["model"]["dropout"] = float(bpe_dropout)
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def variant_folder(cache_dir: Path, train_folder: Path, bpe_dropout: float, index: int) -> Path:
    """The cache folder of variant ``index``: keyed by the canonical split's folder (which already covers
    the source, carve, cleaning and tokenizer), ``bpe_dropout`` and the index. The number of variants is
    left out on purpose, so 4 variants reuse the 2 a previous run made (independent draws either way)."""
    key = cache_key({"kind": "bpe_dropout", "train": train_folder.name, "bpe_dropout": float(bpe_dropout),
                     "variant": index})  # fmt: skip
    return cache_dir / "tokens" / f"{VARIANT_PREFIX}{key}"


def documents_from_tokens(tokens: Any, tokenizer: Tokenizer, eot_id: int | None,
                          chunk_tokens: int = 1 << 22) -> Iterator[tuple[str, bool]]:  # fmt: skip
    """The documents of a prepared split as ``(text, ends_document)`` pieces, decoded from its ids.

    Documents end at ``<|endoftext|>``; the decoded text is the encoded text byte for byte (the
    tokenizers lm supports are lossless). The ids are read ``chunk_tokens`` at a time from the memory
    map, so memory holds a chunk and the document being cut, never the split."""
    if eot_id is None:
        raise LMError("bpe_dropout needs a tokenizer with an <|endoftext|> token (it separates the documents of "
                      "the training split that are re-encoded): add it to --data.special_tokens, or drop bpe_dropout.")
    pending: list[np.ndarray] = []  # ids of the document cut by the chunk boundary
    for offset in range(0, len(tokens), chunk_tokens):
        ids = np.asarray(tokens[offset : offset + chunk_tokens])
        start = 0
        for end in np.flatnonzero(ids == eot_id).tolist():
            yield _decode(tokenizer, [*pending, ids[start:end]]), True
            pending, start = [], end + 1
        if start < len(ids):
            pending.append(ids[start:])
    if pending:  # a last document without an end marker (lm never writes one, but keep its text)
        yield _decode(tokenizer, pending), False


def _decode(tokenizer: Tokenizer, parts: list[np.ndarray]) -> str:
    return b"".join(tokenizer.decode_bytes(part.tolist()) for part in parts).decode("utf-8")
