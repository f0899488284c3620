"""Training the four tokenizer kinds, all with HF ``tokenizers`` and all over the byte-level alphabet.

Every kind keeps the 256 byte tokens, so any text encodes (nothing is ``<unk>``), decodes back to
the same string, and each token stands for a known number of bytes (exact bits-per-byte):

* ``bpe``: byte-level BPE (GPT-2): merges learned by ``BpeTrainer``. The default.
* ``char``: the ``vocab_size`` most frequent characters as single tokens (a rarer character becomes
  its UTF-8 bytes). A BPE model with no merges and ``ignore_merges`` looks each character up whole.
* ``word``: the most frequent words (GPT-2's pre-tokenizer pieces, e.g. ``" river"``) as single
  tokens, found by ``WordLevelTrainer``; any other word is spelled in bytes. Same BPE lookup model.
* ``unigram``: SentencePiece's Unigram language model (``UnigramTrainer``) over byte-level pieces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from lm.errors import LMError

NUM_BYTE_TOKENS = 256
TOKENIZER_KINDS = ("bpe", "char", "word", "unigram")


def minimum_vocab_size(special_tokens: Sequence[str]) -> int:
    """The one vocabulary minimum: the 256 byte tokens plus the special tokens."""
    return NUM_BYTE_TOKENS + len(list(special_tokens))


def train_backend(
    texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int, special_tokens: list[str]
) -> _HFTokenizer:
    """A trained ``tokenizers.Tokenizer`` of ``kind`` with at most ``vocab_size`` ids."""
    _check(kind, vocab_size, min_frequency, special_tokens)
    counted = _NonEmpty(texts)
    if kind == "bpe":
        backend = _train_bpe(counted, vocab_size, min_frequency, special_tokens)
    elif kind == "unigram":
        backend = _train_unigram(counted, vocab_size, special_tokens)
    else:
        backend = _train_lookup(counted, kind, vocab_size, min_frequency, special_tokens)
    if counted.num_chars == 0:
        raise LMError("Cannot train a tokenizer on an empty corpus (no text was given).")
    backend.decoder = decoders.ByteLevel()
    return backend


def _check(kind: str, vocab_size: int, min_frequency: int, special_tokens: list[str]) -> None:
    if kind not in TOKENIZER_KINDS:
        raise LMError(f"Unknown tokenizer kind {kind!r}; expected one of {list(TOKENIZER_KINDS)}.")
    minimum = minimum_vocab_size(special_tokens)
    if vocab_size < minimum:
        raise LMError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs 256 byte tokens plus "
            f"{len(special_tokens)} special tokens, so at least {minimum}."
        )
    if min_frequency < 1:
        raise LMError(f"min_frequency must be >= 1, got {min_frequency}.")
    if len(set(special_tokens)) != len(special_tokens):
        raise LMError(f"special_tokens contains duplicates: {special_tokens}")


def _byte_level(use_regex: bool = True) -> pre_tokenizers.ByteLevel:
    # add_prefix_space=False: a leading space must not be invented, or decode(encode(t)) != t.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: list[str]) -> _HFTokenizer:
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = _byte_level()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    return backend


def _train_unigram(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> _HFTokenizer:
    backend = _HFTokenizer(models.Unigram())
    backend.pre_tokenizer = _byte_level()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    return backend


def _train_lookup(
    texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int, special_tokens: list[str]
) -> _HFTokenizer:
    """``char`` / ``word``: the most frequent pieces as whole tokens, everything else in bytes."""
    if kind == "char":
        # One pre-token per character, then its bytes in byte-level form.
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated"), _byte_level(False)])
        counts = Counter()
        for text in texts:
            counts.update(text)
        pieces = ["".join(pre.pre_tokenize_str(c)[0][0]) for c, n in counts.most_common() if n >= min_frequency]
    else:
        pre = _byte_level()
        counter = _HFTokenizer(models.WordLevel(unk_token="<unk>"))
        counter.pre_tokenizer = pre
        counter.train_from_iterator(texts, trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[], show_progress=False))  # fmt: skip
        pieces = [word for word, _ in sorted(counter.get_vocab().items(), key=lambda item: item[1])]
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for piece in [*pre_tokenizers.ByteLevel.alphabet(), *pieces]:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(special_tokens)
    return backend


class _NonEmpty:
    """Pass non-empty texts through to a trainer while counting characters (to detect an empty corpus)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.num_chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.num_chars += len(text)
            if text:
                yield text
