"""An exact, faster encoder for the default byte-level BPE tokenizer: ``tiktoken`` built from its own merges.

Why: HF ``tokenizers`` is the ceiling of ``lm prepare``'s encoding: it allocates a ``String`` per token
and a ``NormalizedString`` per word, and most of its time goes to those allocations. ``tiktoken`` runs
the same algorithm on byte slices, several times faster per CPU-second on the same text (the figures
and their commands: docs/data.md).

Why the ids are the same (and how we make sure):

* pre-tokenization: HF's ``ByteLevel(add_prefix_space=False, use_regex=True)`` splits with GPT-2's
  regex, which is :data:`GPT2_PATTERN` (``'s|'t|...`` written as one group), then maps each byte to
  a printable stand-in; we give tiktoken the same regex and the vocabulary mapped back to raw bytes,
  so both see the same words as the same byte strings. Added (special) tokens are split out of the
  text first by both (only plain ones: no lstrip/rstrip/single_word/normalized, else no fast path).
* merges: HF merges, inside a word, the adjacent pair whose *merge* comes first (leftmost on ties);
  tiktoken merges the adjacent pair whose *concatenation* has the lowest rank. With rank = token id
  and ids that grow with merge order (what the HF BPE trainer assigns; checked here), these agree
  whenever the pair being concatenated is the one that produced that token. They can differ only if
  a token can be formed by two pairs (``ab+c`` vs ``a+bc``) and the non-merge pair appears — rare
  but not excluded, so this is not a proof for every vocabulary.
* hence :func:`fast_encoder` returns an encoder only for exactly this configuration (no normalizer,
  no dropout, no subword prefix/suffix, no byte fallback), and lm/data/preparation/encode.py compares it with HF
  on the corpus's first batch, falling back to HF with a log line on any difference; the tests
  compare both on Unicode, digits, whitespace runs, apostrophes and emoji.

``tiktoken`` missing (it comes with the ``data`` extra, ``lm[data]``) also means HF, with a log line.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from lm.data.tokenizer import BYTE_DECODER, Tokenizer

logger = logging.getLogger("lm.data")

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PLAIN_BPE = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}  # fmt: skip


class BatchEncoder(Protocol):
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class FastBPE:
    """Encodes like ``Tokenizer.encode_batch`` for a plain byte-level BPE tokenizer (see module docstring)."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int]) -> None:
        import tiktoken

        self._enc = tiktoken.Encoding("lm-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc = self._enc
        return [enc.encode(text, allowed_special="all", disallowed_special=()) for text in texts]


def fast_encoder(tokenizer: Tokenizer) -> FastBPE | None:
    """A :class:`FastBPE` for ``tokenizer`` when its configuration is the plain byte-level BPE, else None."""
    spec = json.loads(tokenizer.to_str())
    reason = _unsupported(spec)
    if reason is None:
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            reason = "tiktoken is not installed: pip install 'lm[data]' for it"
    if reason is not None:
        logger.info("Encoding with HF tokenizers (no tiktoken fast path: %s)", reason)
        return None
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks = {bytes(BYTE_DECODER[c] for c in token): i for token, i in vocab.items() if token not in special}
    return FastBPE(ranks, special)


def _unsupported(spec: dict[str, Any]) -> str | None:
    """Why the fast path can't be exact for this tokenizer JSON, or None when it can."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or any(model.get(k) != v for k, v in _PLAIN_BPE.items()):
        return "not a plain BPE model"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if pre != {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}:
        return "not the ByteLevel pre-tokenizer with GPT-2's regex and no prefix space"
    if any(t.get(k) for t in spec.get("added_tokens", []) for k in ("single_word", "lstrip", "rstrip", "normalized")):
        return "added tokens with strip/word/normalized options"
    special = {t["content"] for t in spec.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"]
    if any(c not in BYTE_DECODER for token in vocab if token not in special for c in token):
        return "tokens outside the byte-level alphabet"
    return _merge_order_problem(vocab, model.get("merges", []), special)


def _merge_order_problem(vocab: dict[str, int], merges: list[Any], special: set[str]) -> str | None:
    """tiktoken ranks are ids: every merged token must exist, ids must grow with merge order and sit
    above every single character, and every other multi-character token must come from a merge."""
    pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in merges]
    merged = ["".join(p) for p in pairs]
    if any(t not in vocab for t in merged):
        return "a merge result missing from the vocabulary"
    ids = [vocab[t] for t in merged]
    if any(a >= b for a, b in zip(ids, ids[1:])):
        return "token ids not in merge order"
    singles = [i for t, i in vocab.items() if len(t) == 1 and t not in special]
    if ids and singles and max(singles) >= ids[0]:
        return "a single-byte token after the first merge"
    if {t for t in vocab if len(t) > 1 and t not in special} != set(merged):
        return "multi-character tokens that no merge produces"
    return None
