"""Light, predictable text cleaning.

Deliberately conservative: it never rewrites words, only normalizes representation and whitespace,
so that the same text always becomes the same tokens and nothing a model should learn is removed.

* Unicode NFC: "é" typed as one code point or as "e" + combining accent becomes the same bytes, so
  the tokenizer doesn't spend vocabulary on two spellings of one character.
* Trailing whitespace per line is stripped (WikiText writes blank lines as " \\n"): invisible bytes
  that cost tokens and teach nothing.
* Runs of more than two blank lines collapse to two; leading/trailing blank lines of a document go.
* Empty documents are dropped, and exact duplicate documents (after cleaning) are kept once: a
  repeated document is memorized rather than learned, and would inflate validation scores if it
  leaked across a split boundary.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines


def clean_document(text: str) -> str:
    """Normalize one document; returns "" for a document with no visible text.

    A non-empty result ends with exactly one newline.
    """
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_BLANK_LINES.sub("\n\n\n", text).strip("\n")
    return text + "\n" if text.strip() else ""


def clean_documents(documents: Iterable[str], *, clean: bool = True, dedupe: bool = True) -> list[str]:
    """Clean documents, drop empty ones and (if ``dedupe``) exact duplicates, keeping first occurrences.

    Args:
        documents: raw documents.
        clean: apply :func:`clean_document`; with False the text is kept byte for byte and only
            documents that are exactly empty are dropped.
        dedupe: drop documents whose (cleaned) text was already seen, compared by SHA-256.
    """
    out: list[str] = []
    seen: set[bytes] = set()
    for doc in documents:
        if clean:
            doc = clean_document(doc)
        if not doc:
            continue
        if dedupe:
            digest = hashlib.sha256(doc.encode("utf-8")).digest()
            if digest in seen:
                continue
            seen.add(digest)
        out.append(doc)
    return out
