"""Output filters: the place to plug in moderation. Every piece of generated text passes through
the response's filter before it leaves the server (streamed or not).

What this file does:
- `OutputFilter`: the protocol. `stream()` returns a fresh `FilterStream` per response, whose
  `feed(text)` returns what may be sent now and `finish()` what is left at the end. A filter may hold
  text back (e.g. a word that is still growing) but must release it by `finish()`.
- `NoFilter`: passes text through.
- `Blocklist`: replaces listed words (whole words, case-insensitive) with `***`; a word is held
  back until the next non-word character shows it is complete, so a streamed word is never split.

To add a moderation model: write a class with `stream()` (e.g. classify each sentence once it ends)
and pass it as `create_app(..., output_filter=MyFilter())`; `lm serve --blocklist FILE` uses
`Blocklist`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Protocol

from lm.errors import LMError, MissingFileError


class FilterStream(Protocol):
    def feed(self, text: str) -> str: ...

    def finish(self) -> str: ...


class OutputFilter(Protocol):
    def stream(self) -> FilterStream: ...


class _PassThrough:
    def feed(self, text: str) -> str:
        return text

    def finish(self) -> str:
        return ""


class NoFilter:
    """The default: text leaves as generated."""

    def stream(self) -> FilterStream:
        return _PassThrough()


class Blocklist:
    """Mask whole words of a list (case-insensitive) with `***`."""

    def __init__(self, words: Iterable[str], mask: str = "***"):
        self.words = sorted({w.strip().lower() for w in words if w.strip()})
        if not self.words:
            raise LMError("The blocklist is empty: give at least one word (one per line in the file).")
        self.mask = mask
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | Path) -> "Blocklist":
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"Blocklist file not found: {path} (one word or phrase per line).")
        return cls(path.read_text(encoding="utf-8").splitlines())

    def stream(self) -> FilterStream:
        return _BlocklistStream(self)


class _BlocklistStream:
    def __init__(self, blocklist: Blocklist):
        self.blocklist = blocklist
        self.pending = ""

    def feed(self, text: str) -> str:
        self.pending += text
        # Release everything up to the last non-word character: what follows may still grow.
        cut = max((m.end() for m in re.finditer(r"\W", self.pending)), default=0)
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return self.blocklist.pattern.sub(self.blocklist.mask, ready)

    def finish(self) -> str:
        ready, self.pending = self.pending, ""
        return self.blocklist.pattern.sub(self.blocklist.mask, ready)
