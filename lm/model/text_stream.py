"""From new token ids to text that is safe to show: `TextAssembler` (one per completion) and the
`TextTokenizer` protocol it needs. Used by `generate_text`, `stream_text` and the `lm serve` engine.
"""

from __future__ import annotations

import codecs
from typing import Optional, Protocol, Sequence


class TextTokenizer(Protocol):
    """What the text level needs from `lm.data.tokenizer.Tokenizer`."""

    eot_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...


class TextAssembler:
    """Turns one completion's new token ids into text pieces that are safe to show.

    - Bytes go through an incremental UTF-8 decoder: a byte-level BPE token may end in the middle of
      a multi-byte character, whose bytes are held until the character is complete, so a piece never
      holds half a character (or a U+FFFD in its place). Bytes that are invalid UTF-8 in any order
      still become U+FFFD; an incomplete character left at the very end is dropped.
    - End of text: the tokenizer's `eot_id` ends the completion (it is not part of the text).
    - Stop strings: the text is cut before the first occurrence of any of them. Text that could still
      grow into a stop string (a suffix that is a prefix of one) is held back until it cannot.

    `feed(token)` returns the text that became safe (maybe ""); `stopped` tells that the completion
    ended (end of text or a stop string); `finish()` releases what was held back when no token follows.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Optional[Sequence[str]]):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that became safe to emit (maybe ""). Sets `stopped`."""
        if self.stopped:
            return ""
        if token_id == self.tokenizer.eot_id:
            return self.finish()
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        # A stop string cannot start inside emitted text (see `_held_back`), so search after it.
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_until(min(hits))
        return self._emit_until(len(self.text) - self._held_back())

    def finish(self) -> str:
        """No more tokens: release what was held back for a stop string that never completed."""
        if self.stopped:  # already cut at a stop string (or finished): nothing more to release
            return ""
        self.stopped = True
        return self._emit_until(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop string."""
        pending = len(self.text) - self.emitted
        for k in range(min(pending, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            suffix = self.text[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _emit_until(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece
