"""Cleaned documents parked on disk between passes, and the validation tail carved off them.

Preparing a split reads its cleaned documents more than once (train the tokenizer, then encode),
and a carved validation split needs the total length before it knows where to cut. Holding the
documents in a list would cap the corpus at the size of RAM; instead :class:`StagedDocuments` writes
them once to a flat UTF-8 file and keeps only two small arrays (byte offset and character count per
document). :class:`Span` then streams any range of them back, with the document cut by
``val_fraction`` split at a line start.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.errors import LMError


class StagedDocuments:
    """Documents written to ``path`` back to back; read back by index ranges through ``mmap``."""

    def __init__(self, path: Path, documents: Iterable[str]) -> None:
        self.path = path
        offsets, chars = array("q", [0]), array("q")
        with path.open("wb") as f:
            for doc in documents:
                data = doc.encode("utf-8")
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                chars.append(len(doc))
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.chars = np.frombuffer(chars, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def num_chars(self) -> int:
        return int(self.chars.sum())

    def iter(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        stop = len(self) if stop is None else stop
        if start >= stop or self.offsets[-1] == 0:
            return
        with self.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            for i in range(start, stop):
                yield view[self.offsets[i] : self.offsets[i + 1]].decode("utf-8")

    def document(self, index: int) -> str:
        return next(self.iter(index, index + 1))

    def whole(self) -> Span:
        return Span(self, 0, len(self))


@dataclass
class Span:
    """Documents ``[start, stop)`` of a staged file, plus the halves of a document cut by a carve.

    ``lead`` (the second half of a cut document) comes first and ends that document; ``trail`` (the
    first half) comes last and gets no end-of-text token, since the document goes on elsewhere.
    Iterating yields ``(text, ends_document)``.
    """

    staged: StagedDocuments
    start: int
    stop: int
    lead: str = ""
    trail: str = ""

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        if self.lead:
            yield self.lead, True
        for doc in self.staged.iter(self.start, self.stop):
            yield doc, True
        if self.trail:
            yield self.trail, False

    def texts(self) -> Iterator[str]:
        return (text for text, _ in self)

    @property
    def num_documents(self) -> int:
        return self.stop - self.start + bool(self.lead) + bool(self.trail)


def carve_tail(staged: StagedDocuments, fraction: float) -> tuple[Span, Span]:
    """Split staged documents into (head, tail); the tail holds ``fraction`` of the characters.

    The cut is placed at the start of the line holding the target character, so validation text
    starts on a line boundary. A target on a document's first line cuts before that document.
    """
    if not 0.0 < fraction < 1.0:
        raise LMError(f"fraction must be in (0, 1), got {fraction}.")
    ends = np.cumsum(staged.chars)
    total = int(ends[-1]) if len(ends) else 0
    target = total - int(round(total * fraction))
    k = int(np.searchsorted(ends, target, side="right"))  # first document ending after the target
    if k >= len(staged):
        return staged.whole(), Span(staged, len(staged), len(staged))
    local = target - (int(ends[k - 1]) if k else 0)
    if local == 0:
        return Span(staged, 0, k), Span(staged, k, len(staged))
    doc = staged.document(k)
    line_start = doc.rfind("\n", 0, local) + 1
    if line_start == 0:
        if k > 0:  # the target is on the document's first line: cut before the document
            return Span(staged, 0, k), Span(staged, k, len(staged))
        line_start = local  # a single line of text: no line break to align to
    return Span(staged, 0, k, trail=doc[:line_start]), Span(staged, k + 1, len(staged), lead=doc[line_start:])
