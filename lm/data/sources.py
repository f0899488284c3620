"""Where text comes from: local files, a local WikiText folder, or the Hugging Face Hub.

Everything here returns *documents* (a list of strings). Documents matter because the token stream
puts an ``<|endoftext|>`` token after each one, so the model learns where one article ends and the
next unrelated one begins, instead of learning to continue article A with article B.

A source also knows its *fingerprint*: the small JSON-able description that goes into the token
cache key (file paths, sizes and modification times; or the hub name, config and split), so editing
or replacing a file invalidates the cache without hashing gigabytes of text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lm.errors import LMError, MissingFileError

WIKITEXT_URL = "https://huggingface.co/datasets/Salesforce/wikitext"
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_SPLIT_ALIASES = {
    "train": "train", "validation": "validation", "valid": "validation", "val": "validation", "test": "test"
}  # fmt: skip

# A WikiText article starts with a top-level heading line " = Title = " (one "=" on each side);
# " = = Section = = " and deeper headings are subsections and stay inside the article.
_ARTICLE_HEADING = re.compile(r"^ = (?!=)[^\n]*?(?<!=) = [ \t]*$", re.MULTILINE)


def _how_to_get_data(option: str) -> str:
    return (
        f"Download WikiText-2 raw from {WIKITEXT_URL} (config wikitext-2-raw-v1; files "
        f"{', '.join(WIKITEXT_FILES.values())}) and pass --data.data_dir, or pass your own plain "
        f"text files with {option} [path, ...]."
    )


def read_text_files(paths: Sequence[str | os.PathLike[str]], option: str = "--data.train_files") -> str:
    """Read and concatenate UTF-8 text files (universal newlines, so CRLF files read as LF).

    Args:
        paths: files to read, in order.
        option: the command-line option that supplied them, quoted in the error message.

    Raises:
        FileNotFoundError: naming every missing path (all at once, not just the first) and how to
            get the data.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise LMError(f"No files given ({option} is empty).")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        kind = "Not a file" if all(Path(m).exists() for m in missing) else "File not found"
        raise MissingFileError(f"{kind}: {', '.join(missing)}. {_how_to_get_data(option)}")
    parts = []
    for p in paths:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LMError(f"{p} is not valid UTF-8 text ({err}). Convert it to UTF-8 first.") from err
    return "".join(parts)


def load_wikitext_split(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    hub_name: str = "Salesforce/wikitext",
    hub_config: str = "wikitext-2-raw-v1",
) -> str:
    """Return one WikiText split as raw text.

    From ``data_dir/wiki.{train,valid,test}.raw`` when ``data_dir`` is given, else through
    ``datasets.load_dataset``. The Hub stores one row per line with blank lines as ``""``; rows are
    joined back into the original file layout (blank lines are ``" \\n"`` in the raw files), so the
    two routes give the same text and therefore the same tokens.

    Args:
        split: "train", "validation" (or "valid"/"val") or "test".
        data_dir: local folder holding the ``wiki.*.raw`` files.
        hub_name: dataset repository on the Hub.
        hub_config: dataset config, e.g. "wikitext-2-raw-v1" or "wikitext-103-raw-v1".
    """
    if split not in _SPLIT_ALIASES:
        raise LMError(f"Unknown WikiText split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}.")
    split = _SPLIT_ALIASES[split]
    if data_dir is not None:
        return read_text_files([Path(data_dir) / WIKITEXT_FILES[split]], option=f"--data.{_option_for(split)}")
    try:
        from datasets import load_dataset  # heavy import, only on this path

        dataset = load_dataset(hub_name, hub_config, split=split)
    except Exception as err:  # offline: ConnectionError, OfflineModeIsEnabled, LocalEntryNotFound...
        raise LMError(
            f"Could not load {hub_name!r} (config {hub_config!r}, split {split!r}) from the Hugging Face "
            f"Hub: {type(err).__name__}: {err}\nIf you are offline, use local files instead: "
            "--data.data_dir FOLDER (holding wiki.train.raw, wiki.valid.raw, wiki.test.raw) or "
            "--data.train_files / --data.val_files / --data.test_files."
        ) from err
    return "".join(row if row else " \n" for row in dataset["text"])


def _option_for(split: str) -> str:
    return {"train": "train_files", "validation": "val_files", "test": "test_files"}[split]


def split_documents(text: str) -> list[str]:
    """Split text into documents.

    WikiText: every top-level heading line `` = Title = `` starts a new article (any text before the
    first heading is kept with the first article, so nothing is lost: ``"".join(docs) == text``).
    Any other text (no such heading) is one document: a novel, a code file, a chat log.
    """
    starts = [m.start() for m in _ARTICLE_HEADING.finditer(text)]
    if not starts:
        return [text] if text else []
    starts[0] = 0
    ends = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, ends)]


def carve_tail(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str], bool]:
    """Split documents into (head, tail) where the tail holds about ``fraction`` of the characters.

    The cut is placed at the start of the line holding the target position, so validation text
    starts on a line boundary (and the tail is never empty for ``fraction > 0``). Carving *text*
    rather than tokens lets the tokenizer be trained on the head only: the validation text never
    influences the vocabulary.

    Returns:
        ``(head, tail, cut_inside_document)``. When the cut falls inside a document, that document's
        first part ends ``head`` and its rest starts ``tail``; the caller must not put an
        end-of-text token after a half document.
    """
    if not 0.0 < fraction < 1.0:
        raise LMError(f"fraction must be in (0, 1), got {fraction}.")
    total = sum(len(d) for d in documents)
    target = total - int(round(total * fraction))
    seen = 0
    for k, doc in enumerate(documents):
        if seen + len(doc) <= target:
            seen += len(doc)
            continue
        local = target - seen
        if local == 0:  # the target is exactly a document boundary
            return list(documents[:k]), list(documents[k:]), False
        line_start = doc.rfind("\n", 0, local) + 1
        if line_start == 0:
            if k > 0:  # the target is on the document's first line: cut before the document
                return list(documents[:k]), list(documents[k:]), False
            line_start = local  # a single line of text: no line break to align to
        return [*documents[:k], doc[:line_start]], [doc[line_start:], *documents[k + 1 :]], True
    return list(documents), [], False


# ---------------------------------------------------------------------- sources


class TextSource(Protocol):
    """Something that yields documents and can say, cheaply, whether its content changed."""

    def fingerprint(self) -> dict[str, Any]: ...
    def describe(self) -> str: ...
    def check(self) -> None: ...
    def documents(self) -> list[str]: ...


@dataclass(frozen=True)
class FileSource:
    """Plain text files; WikiText-formatted files are split into articles, any other file is one document.

    Args:
        paths: the files, in order.
        option: the CLI option that named them (for error messages).
    """

    paths: tuple[str, ...]
    option: str = "--data.train_files"

    def check(self) -> None:
        """Fail early, naming every missing file, before any expensive work starts."""
        missing = [p for p in self.paths if not Path(p).is_file()]
        if missing:
            raise MissingFileError(f"File not found: {', '.join(missing)}. {_how_to_get_data(self.option)}")

    def fingerprint(self) -> dict[str, Any]:
        self.check()
        files = []
        for p in self.paths:
            stat = Path(p).stat()
            files.append({"path": str(Path(p).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return {"kind": "files", "files": files}

    def describe(self) -> str:
        return ", ".join(self.paths)

    def documents(self) -> list[str]:
        docs: list[str] = []
        for p in self.paths:
            docs.extend(split_documents(read_text_files([p], option=self.option)))
        return docs


@dataclass(frozen=True)
class HubSource:
    """A WikiText split on the Hugging Face Hub (read through ``datasets``, which keeps its own cache)."""

    name: str
    config: str
    split: str

    def check(self) -> None:
        pass  # only known when downloading

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "hub", "name": self.name, "config": self.config, "split": self.split}

    def describe(self) -> str:
        return f"hf://{self.name}/{self.config}[{self.split}]"

    def documents(self) -> list[str]:
        return split_documents(load_wikitext_split(self.split, hub_name=self.name, hub_config=self.config))
