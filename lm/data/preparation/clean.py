"""Document cleaning: every step optional (``data.cleaning`` in YAML) and counted in the data report.

Order, per document: normalize -> drop empty -> length and repetition filters -> exact dedup ->
near dedup (lm/data/preparation/dedup.py) -> PII redaction. Deduplication compares normalized text and runs
after the filters, so a removed document is counted once, by the first step that removed it.

Normalization (:func:`normalize`):

* broken-encoding repair with ftfy (mojibake such as ``cafÃ©`` -> ``café``), off by default;
* Unicode NFC (default) or NFKC: one byte sequence per character, so the tokenizer doesn't spend
  vocabulary on two spellings of ``é``;
* control characters (other than newline and tab) removed;
* whitespace: ``trim`` (default) strips trailing whitespace per line and collapses runs of more than
  two blank lines; ``collapse`` also turns runs of spaces and tabs into one space; ``keep`` leaves it;
* optional lowercasing.

The defaults change nothing a model should learn (WikiText-2 keeps its words byte for byte), so
published figures stay comparable. PII redaction (e-mail addresses, phone numbers, IP addresses,
credit-card-like numbers) replaces each match with a placeholder such as ``<EMAIL>`` and counts it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lm.data.preparation.dedup import ExactDeduplicator, NearDeduplicator
from lm.errors import LMError
from lm.extras import require

_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines
_TRAILING_SPACE = re.compile(r"[ \t\r\f\v]+$", re.MULTILINE)
_SPACE_RUNS = re.compile(r"[ \t]{2,}")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except \t and \n

# PII patterns. Deliberately conservative (few false positives on prose): a phone number needs a
# leading + or a separator-grouped shape; a card number must pass the Luhn checksum.
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ip_address": re.compile(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
        r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"
    ),
    "credit_card": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    # Not inside a longer run of digit groups (an order number, a card that failed the Luhn check).
    "phone": re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{3,4}"
                        r"\b(?![ .-]?\d)"),
}
PII_PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
                    "phone": "<PHONE>"}  # fmt: skip
# Cards before phones: a 16-digit card number also has a phone-like shape.
_PII_ORDER = ("email", "ip_address", "credit_card", "phone")


@dataclass
class CleaningOptions:
    """What cleaning does (each step optional). ``data.clean: false`` turns all of it off, and is
    refused together with steps that differ from these defaults (TextDataModule: set ``clean: true``
    next to the steps, or drop them).

    Args:
        unicode: ``NFC`` (default), ``NFKC`` (also folds compatibility forms: ligatures, full-width
            letters) or ``none``.
        fix_encoding: repair mojibake with ftfy (``cafÃ©`` -> ``café``).
        remove_control_chars: drop C0/C1 control characters except newline and tab.
        whitespace: ``trim`` (trailing spaces per line, at most two blank lines in a row),
            ``collapse`` (also runs of spaces/tabs -> one space) or ``keep``.
        lowercase: lowercase everything.
        min_chars: drop documents shorter than this (after normalization).
        max_chars: drop documents longer than this (None: no limit).
        max_duplicate_line_fraction: drop documents whose repeated lines hold more than this fraction
            of the characters (boilerplate, menus, logs). None: off.
        max_top_ngram_fraction: drop documents where the most frequent word 3-gram covers more than
            this fraction of the characters (spam, "buy now buy now"). None: off.
        exact_dedup: keep only the first of documents with identical normalized text.
        near_dedup: drop documents whose word n-gram Jaccard similarity to a kept one is about
            ``near_dedup_threshold`` or more (MinHash-LSH, datasketch).
        near_dedup_threshold: Jaccard similarity at which two documents count as near duplicates.
        near_dedup_ngram: words per shingle.
        near_dedup_num_perm: MinHash permutations (more: finer estimates, more memory and time).
        redact_pii: replace e-mail addresses, phone numbers, IP addresses and credit-card-like
            numbers with placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``).
    """

    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    fix_encoding: bool = False
    remove_control_chars: bool = True
    whitespace: Literal["trim", "collapse", "keep"] = "trim"
    lowercase: bool = False
    min_chars: int = 1
    max_chars: int | None = None
    max_duplicate_line_fraction: float | None = None
    max_top_ngram_fraction: float | None = None
    exact_dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    near_dedup_ngram: int = 5
    near_dedup_num_perm: int = 128
    redact_pii: bool = False

    def __post_init__(self) -> None:
        if self.min_chars < 1:
            raise LMError(f"cleaning.min_chars must be >= 1, got {self.min_chars}.")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise LMError(f"cleaning.max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars}).")
        for name in ("max_duplicate_line_fraction", "max_top_ngram_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise LMError(f"cleaning.{name} must be in (0, 1] or null, got {value}.")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise LMError(f"cleaning.near_dedup_threshold must be in (0, 1], got {self.near_dedup_threshold}.")
        if self.near_dedup_ngram < 1 or self.near_dedup_num_perm < 16:
            raise LMError("cleaning.near_dedup_ngram must be >= 1 and near_dedup_num_perm >= 16.")
        # Checked with the options, before any data is read (and before encode workers start).
        if self.fix_encoding:
            require("data", "cleaning.fix_encoding", ("ftfy",))
        if self.near_dedup:
            require("data", "cleaning.near_dedup", ("datasketch",))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize(text: str, options: CleaningOptions) -> str:
    """Normalize one document; returns "" for a document with no visible text.

    A non-empty result ends with exactly one newline (unless ``whitespace="keep"``).
    """
    if options.fix_encoding:
        text = _fix_encoding(text)
    if options.unicode != "none":
        text = unicodedata.normalize(options.unicode, text)
    if options.remove_control_chars:
        text = _CONTROL_CHARS.sub("", text)
    if options.lowercase:
        text = text.lower()
    if options.whitespace == "keep":
        return text if text.strip() else ""
    if options.whitespace == "collapse":
        text = _SPACE_RUNS.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text).strip("\n")
    return text + "\n" if text.strip() else ""


def _fix_encoding(text: str) -> str:
    (ftfy,) = require("data", "cleaning.fix_encoding", ("ftfy",))  # only when asked for

    # Only the repairs (mojibake, lossy sequences, C1 controls); quotes, ligatures, widths and
    # normalization are left to the options above, so fix_encoding never rewrites correct text.
    config = ftfy.TextFixerConfig(
        unescape_html=False, remove_terminal_escapes=False, fix_latin_ligatures=False, fix_character_width=False,
        uncurl_quotes=False, fix_line_breaks=False, remove_control_chars=False, normalization=None, explain=False,
    )  # fmt: skip
    return ftfy.fix_text(text, config)


def filter_reason(text: str, options: CleaningOptions) -> str | None:
    """Name of the filter that removes this (normalized, non-empty) document, or None to keep it."""
    if len(text) < options.min_chars:
        return "too_short"
    if options.max_chars is not None and len(text) > options.max_chars:
        return "too_long"
    limit = options.max_duplicate_line_fraction
    if limit is not None and duplicate_line_fraction(text) > limit:
        return "repeated_lines"
    limit = options.max_top_ngram_fraction
    if limit is not None and top_ngram_fraction(text) > limit:
        return "repeated_ngrams"
    return None


def duplicate_line_fraction(text: str) -> float:
    """Fraction of the characters of non-blank lines that sit in lines seen before in the document."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    total = sum(map(len, lines))
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def top_ngram_fraction(text: str, n: int = 3) -> float:
    """Fraction of word characters covered by the most frequent word n-gram (counted per occurrence)."""
    words = text.split()
    if len(words) < 2 * n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return min(1.0, count * sum(map(len, gram)) / sum(map(len, words)))


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that payment card numbers carry (filters out most random digit runs)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_pii(text: str, counts: Counter[str] | None = None) -> str:
    """Replace PII with placeholders; add the number of replacements per kind to ``counts``."""
    counts = counts if counts is not None else Counter()

    def replace(kind: str) -> Any:
        def sub(match: re.Match[str]) -> str:
            if kind == "credit_card" and not luhn_valid(re.sub(r"\D", "", match.group())):
                return match.group()
            counts[kind] += 1
            return PII_PLACEHOLDERS[kind]

        return sub

    for kind in _PII_ORDER:
        text = PII_PATTERNS[kind].sub(replace(kind), text)
    return text


@dataclass
class CleaningReport:
    """Counts of one source's cleaning: documents in/out, removed per step, PII replaced per kind."""

    documents_in: int = 0
    documents_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"documents_in": self.documents_in, "documents_out": self.documents_out,
                "chars_in": self.chars_in, "chars_out": self.chars_out, "removed": dict(self.removed),
                "pii_replaced": dict(self.pii), "seconds": self.seconds}  # fmt: skip


def clean_documents(
    documents: Iterable[str], options: CleaningOptions | None, report: CleaningReport | None = None
) -> Iterator[str]:
    """Stream cleaned documents (``options`` None: byte for byte, only exactly empty ones dropped).

    Memory: exact dedup keeps a 16-byte digest per kept document, near dedup its MinHash-LSH entries
    (~0.5 KB at 128 permutations); never the texts.
    """
    report = report if report is not None else CleaningReport()
    exact = ExactDeduplicator() if options is not None and options.exact_dedup else None
    near = NearDeduplicator(options) if options is not None and options.near_dedup else None
    for doc in documents:
        report.documents_in += 1
        report.chars_in += len(doc)
        reason = _removal_reason(doc, options, exact, near)
        if isinstance(reason, str):
            report.removed[reason] += 1
            continue
        doc = reason[0]
        if options is not None and options.redact_pii:
            doc = redact_pii(doc, report.pii)
        report.documents_out += 1
        report.chars_out += len(doc)
        yield doc


def _removal_reason(doc: str, options: CleaningOptions | None, exact: Any, near: Any) -> str | tuple[str]:
    """The step that removes ``doc`` (a str), or ``(normalized_doc,)`` when it is kept."""
    if options is None:
        return (doc,) if doc else "empty"
    doc = normalize(doc, options)
    if not doc:
        return "empty"
    reason = filter_reason(doc, options)
    if reason is not None:
        return reason
    if exact is not None and exact.seen(doc):
        return "exact_duplicate"
    if near is not None and near.seen(doc):
        return "near_duplicate"
    return (doc,)
