"""The tokenizer: byte-level BPE (default), character-level, word-level or Unigram, all HF ``tokenizers``.

Hugging Face ``tokenizers`` is imported here and in lm/data/tokenizer_training.py (which trains the
vocabularies) and nowhere else: everything else talks to :class:`Tokenizer`, so swapping the backend
touches those two files.

Every kind works on the byte-level alphabet (GPT-2's 256 printable stand-ins for the bytes), and the
256 byte tokens are always in the vocabulary, so *any* text encodes without an ``<unk>`` and decodes
back to exactly the same string; the kinds differ only in which longer tokens they add (merges, whole
characters, whole words, Unigram pieces: see lm/data/tokenizer_training.py).
That lossless round trip is what makes two things in this framework exact rather than approximate:

* bits-per-byte: :meth:`Tokenizer.token_byte_lengths` tells how many UTF-8 bytes each token stands
  for, so a summed loss can be divided by the true number of bytes in the evaluated text;
* streaming generation: :meth:`Tokenizer.decode_bytes` gives raw bytes, so a streaming printer can hold
  back an incomplete UTF-8 sequence instead of emitting a replacement character mid-character.

A second family is accepted for models imported from Hugging Face (`lm import`, lm/io/hf_import.py):
SentencePiece-style BPE (Llama 2, TinyLlama, Mistral): pieces spell a space as ``▁`` (U+2581) and
``byte_fallback`` spells any character outside the vocabulary as ``<0xNN>`` byte tokens, so every
piece still stands for known bytes. SentencePiece's "dummy prefix" (a ``▁`` put before the text) is
switched off when such a tokenizer is wrapped: it is a byte that is not in the text, and documents
encoded one by one would each gain a space, so neither decode nor the byte counts would be exact.
The one text such a tokenizer cannot give back is a literal ``▁``, which it reads as a space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers

from lm.errors import LMError, MissingFileError
from lm.data.tokenizer_training import NUM_BYTE_TOKENS, TOKENIZER_KINDS, minimum_vocab_size, train_backend
from lm.io.files import atomic_write_text

EOT = "<|endoftext|>"
"""Document separator: appended after every document in the token stream (GPT-2 convention)."""

METASPACE = "\u2581"
"""``▁``: SentencePiece's stand-in for a space inside pieces."""

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by the ByteLevel pre-tokenizer.

    Byte-level BPE vocabularies store tokens as strings over this 256-character alphabet (printable
    bytes map to themselves, the rest are shifted to U+0100 and up). Inverting it turns a token string
    back into the raw bytes it stands for.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(NUM_BYTE_TOKENS):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTE_TOKENS + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` over the byte-level alphabet, with exact byte accounting.

    Construct it with :meth:`train`, :meth:`from_file` or :meth:`from_str`; the constructor wraps an
    already built ``tokenizers.Tokenizer`` and checks that its tokens are byte-level strings (the byte
    accounting below relies on that), or SentencePiece-style pieces with byte fallback (module docstring).
    """

    def __init__(self, backend: _HFTokenizer) -> None:
        self._metaspace = _check_supported(backend)
        self._tok = backend

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (EOT,),
        kind: str = "bpe",
    ) -> Tokenizer:
        """Learn a vocabulary of at most ``vocab_size`` tokens (byte tokens and specials included).

        ``kind``: ``bpe`` (byte-level BPE merges), ``char`` (whole characters), ``word`` (whole
        words, with their leading space) or ``unigram`` (SentencePiece-style pieces). Characters,
        words or pieces outside the vocabulary fall back to byte tokens, so nothing is ever unknown.
        The result may be smaller than ``vocab_size`` on a small corpus; size model embeddings from
        the *requested* vocabulary size.
        """
        return cls(train_backend(texts, kind, vocab_size, min_frequency, list(special_tokens)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(
                f"Tokenizer file not found: {path}. Pass the tokenizer.json written by a previous run "
                "(or leave tokenizer_path unset to train one on the training split)."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LMError(f"{path} is not a tokenizer.json (not UTF-8 text: {err.reason} at byte {err.start}). Pass the "
                          "tokenizer.json written by a previous run.") from err
        return cls.from_str(text)

    @classmethod
    def from_str(cls, json_str: str) -> Tokenizer:
        """Restore from :meth:`to_str` output, e.g. a string stored inside a model checkpoint."""
        try:
            backend = _HFTokenizer.from_str(json_str)
        except Exception as err:  # the Rust side raises a bare Exception subclass
            raise LMError(f"Not a valid tokenizer JSON: {err}") from err
        return cls(backend)

    # ------------------------------------------------------------------ serialization

    def to_str(self) -> str:
        """Serialize to the ``tokenizer.json`` format (a JSON string)."""
        return self._tok.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically: readers never see a half-written file."""
        atomic_write_text(Path(path), self.to_str())

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Actual number of ids, special tokens included (may be below the size asked for in training)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """Id of ``<|endoftext|>``, or None if this tokenizer has no such token."""
        return self._tok.token_to_id(EOT)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of added/special tokens (they stand for no bytes of the original text)."""
        return frozenset(self._tok.get_added_tokens_decoder())

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """The ids of `text` (special tokens written in it, such as ``<|endoftext|>``, become their ids)."""
        # Through the batch call: its fast variant skips the character offsets, which lm never reads, and took
        # the raw WikiText-2 test file (1.3 MB) from 0.6-0.8 s to 0.37 s. The same ids as the backend's `encode`.
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; the Rust backend spreads them over threads."""
        # encode_batch_fast skips computing character offsets, which lm never reads; tokenizers >= 0.20.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode`; special tokens are kept as their text (e.g. ``<|endoftext|>``)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw UTF-8 bytes of the tokens (special tokens as their UTF-8 text).

        A single token may hold part of a multi-byte character; concatenating bytes first and decoding
        only complete sequences is how a streaming decoder avoids emitting half a character.
        """
        table = self._id_to_bytes
        return b"".join(table[int(i)] for i in ids)

    def token_byte_lengths(self) -> list[int]:
        """For every id, how many UTF-8 bytes of the original text it stands for (special tokens: 0).

        Summing this over the targets of an evaluation gives the exact byte count for bits-per-byte.
        """
        specials = self.special_ids
        return [0 if i in specials else len(b) for i, b in enumerate(self._id_to_bytes)]

    @cached_property
    def _id_to_bytes(self) -> list[bytes]:
        table: list[bytes] = []
        specials = self.special_ids
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None:  # a hole in the id space; never produced by encode
                table.append(b"")
            elif i in specials:
                table.append(token.encode("utf-8"))
            elif self._metaspace:
                table.append(metaspace_piece_bytes(token))
            else:
                table.append(bytes(BYTE_DECODER[c] for c in token))
        return table

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# ---------------------------------------------------------------------- helpers


def metaspace_piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece-style piece stands for: ``<0xNN>`` is byte NN, ``▁`` a space, the rest UTF-8."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:  # e.g. "<0xZZ>": an ordinary piece that only looks like a byte token
            pass
    return piece.replace(METASPACE, " ").encode("utf-8")


def _check_supported(backend: _HFTokenizer) -> bool:
    """Refuse tokenizers whose tokens don't stand for known bytes; True for the SentencePiece-style family.

    :meth:`Tokenizer.decode_bytes` and :meth:`Tokenizer.token_byte_lengths` map every token to the bytes
    it stands for; on a tokenizer outside the two families they would silently produce wrong byte counts.
    """
    spec = json.loads(backend.to_str())
    if _is_metaspace(spec):
        _make_metaspace_lossless(backend, spec)
        return True
    _check_byte_level(backend, spec)
    return False


def _check_byte_level(backend: _HFTokenizer, spec: dict) -> None:
    """Refuse tokenizers whose tokens aren't strings over the byte-level alphabet."""
    model_type = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    pre_types = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if model_type not in ("BPE", "Unigram") or "ByteLevel" not in pre_types:
        raise LMError(
            "Only byte-level tokenizers (a BPE or Unigram model behind a ByteLevel pre-tokenizer, as lm trains "
            "them) and SentencePiece-style BPE with byte fallback (Llama 2) are supported; got "
            f"model={model_type!r}, pre_tokenizer={pre.get('type')!r}, normalizer={(spec.get('normalizer') or {}).get('type')!r}."
        )
    if spec.get("normalizer") is not None:
        raise LMError(
            "The tokenizer has a normalizer, so decode(encode(text)) would not reproduce the text; "
            "a byte-level tokenizer without a normalizer is required."
        )
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        backend.decoder = decoders.ByteLevel()


# ------------------------------------------------------------------- SentencePiece-style BPE


def _space_steps(spec: dict) -> list[dict]:
    """The normalizer and pre-tokenizer steps of a tokenizer JSON, flattened out of their Sequences."""
    steps = []
    for key, inner in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        step = spec.get(key) or {}
        steps += step.get(inner, []) if step.get("type") == "Sequence" else [step] if step else []
    return steps


def _is_metaspace(spec: dict) -> bool:
    """A BPE model whose pieces spell spaces as ``▁`` (a Metaspace pre-tokenizer or a Replace normalizer)."""
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and any(
        step.get("type") == "Metaspace" or (step.get("type") == "Replace" and step.get("content") == METASPACE)
        for step in _space_steps(spec))


def _make_metaspace_lossless(backend: _HFTokenizer, spec: dict) -> None:
    """Switch SentencePiece's dummy prefix off (in place) and refuse what still would not be exact.

    The two layouts transformers writes: a `Prepend("▁")` + `Replace(" ", "▁")` normalizer (older
    conversions, TinyLlama), or a `Metaspace` pre-tokenizer with `prepend_scheme` (newer ones). The
    decoder becomes ▁ -> space, `<0xNN>` -> byte, without the `Strip` that removed the dummy prefix."""
    model = spec["model"]
    steps = _space_steps(spec)
    allowed = [s for s in steps if s.get("type") in ("Prepend", "Metaspace")
               or (s.get("type") == "Replace" and s.get("pattern") == {"String": " "} and s.get("content") == METASPACE)]
    if len(allowed) != len(steps) or any(s.get("replacement", METASPACE) != METASPACE for s in steps):
        kinds = sorted({s.get("type") for s in steps} - {"Prepend", "Metaspace", "Replace"})
        raise LMError(f"This SentencePiece-style tokenizer also has {kinds or 'another ▁ replacement'} steps, "
                      "so its pieces do not stand for known bytes: only spaces spelled as ▁ are supported.")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in model.get("vocab", {})]
    if not model.get("byte_fallback") or missing:
        raise LMError("This SentencePiece-style tokenizer has no byte fallback (byte_fallback with all 256 <0xNN> "
                      f"tokens; {len(missing)} missing): text outside its vocabulary would become <unk>, which "
                      "stands for no known bytes. Use a tokenizer with byte_fallback (Llama 2 and TinyLlama have it).")
    if any(s.get("type") == "Metaspace" for s in steps):
        split = next(s.get("split", True) for s in steps if s.get("type") == "Metaspace")
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never", split=split)
    else:
        backend.normalizer = normalizers.Replace(" ", METASPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
