"""Where documents come from, streamed one at a time (a corpus larger than RAM is never held whole).

* :class:`FileSource`: local files and globs. The format follows the suffix: ``.jsonl`` / ``.json``
  (one JSON object per line, text in ``text_field``), ``.parquet`` (the ``text_field`` column, read
  in record batches), anything else plain UTF-8 text. A text file in WikiText layout is split into
  articles at its top-level `` = Title = `` headings; any other text file is one document.
* :class:`HubSource`: a Hugging Face dataset by name / config / split through ``datasets`` (also
  ``streaming=True``: rows arrive over the network, nothing is downloaded whole). The WikiText preset
  (``Salesforce/wikitext``) rebuilds the raw-file layout from its one-row-per-line storage, so the hub
  and a local ``wiki.*.raw`` give the same documents.

Document boundaries matter: the token stream puts ``<|endoftext|>`` after each document, so the model
learns where an article ends instead of continuing article A with article B.

A source also has a *fingerprint*: a small JSON-able description that goes into the cache keys (file
paths, sizes and modification times; or the dataset name, config, split and field), so editing a
file invalidates the cache without hashing gigabytes of text.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lm.errors import LMError, MissingFileError

WIKITEXT_URL = "https://huggingface.co/datasets/Salesforce/wikitext"
WIKITEXT_HUB_NAME = "Salesforce/wikitext"
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
"""The one definition of WikiText's raw file names, by split."""

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB: a binary file, not text

# A WikiText article starts with a top-level heading line " = Title = " (one "=" on each side);
# " = = Section = = " and deeper headings are subsections and stay inside the article.
_ARTICLE_HEADING = re.compile(r"^ = (?!=)[^\n]*?(?<!=) = [ \t]*$")


def how_to_get_data(option: str) -> str:
    return (
        f"Download WikiText-2 raw from {WIKITEXT_URL} (config wikitext-2-raw-v1; files "
        f"{', '.join(WIKITEXT_FILES.values())}) and pass --data.data_dir, or pass your own files "
        f"(text, .jsonl or .parquet; globs allowed) with {option} [path, ...]."
    )


def expand_paths(patterns: Sequence[str], option: str) -> list[Path]:
    """Paths and glob patterns (``data/*.jsonl``, ``**`` recursive) to a list of files, in order.

    Raises:
        MissingFileError: naming every path or pattern that matched no file (all at once).
    """
    if not patterns:
        raise LMError(f"No files given ({option} is empty).")
    files: list[Path] = []
    missing = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        else:
            matched = [Path(pattern)] if Path(pattern).is_file() else []
        if not matched:
            missing.append(pattern)
        files.extend(matched)
    if missing:
        kind = "Not a file" if all(Path(m).exists() for m in missing) else "File not found"
        raise MissingFileError(f"{kind}: {', '.join(missing)}. {how_to_get_data(option)}")
    return files


def split_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group lines (each ending in a newline) into documents at WikiText top-level headings.

    Text before the first heading stays with the first article, so nothing is lost:
    ``"".join(split_articles(lines)) == "".join(lines)``. Lines without such a heading are one document.
    """
    current: list[str] = []
    seen_heading = False
    for line in lines:
        if line.startswith(" = ") and _ARTICLE_HEADING.match(line.rstrip("\n")):
            if seen_heading:
                yield "".join(current)
                current = []
            seen_heading = True
        current.append(line)
    if current:
        yield "".join(current)


def _check_text_file(path: Path) -> None:
    """Clear errors for an empty or binary file before any line is read."""
    if path.stat().st_size == 0:
        raise LMError(f"{path} is empty: remove it from the file list or give it some text.")
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise LMError(
            f"{path} looks like a binary file (it contains NUL bytes), not UTF-8 text: pass text, "
            ".jsonl or .parquet files only."
        )


def read_text_documents(path: Path) -> Iterator[str]:
    """Documents of one UTF-8 text file (universal newlines: CRLF reads as LF), streamed by line."""
    _check_text_file(path)
    try:
        with path.open(encoding="utf-8") as f:
            yield from split_articles(f)
    except UnicodeDecodeError as err:
        raise LMError(f"{path} is not valid UTF-8 text ({err}). Convert it to UTF-8 first.") from err


def read_jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of every JSON object in a JSON-lines file (blank lines skipped)."""
    _check_text_file(path)
    try:
        with path.open(encoding="utf-8", errors="strict") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LMError(f"{path}:{number} is not a JSON object ({err}); one object per line is expected.") from err
                yield _text_of(row, text_field, f"{path}:{number}")
    except UnicodeDecodeError as err:
        raise LMError(f"{path} is not valid UTF-8 text ({err}). Convert it to UTF-8 first.") from err


def _text_of(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise LMError(
            f"{where} has no {text_field!r} field (it has: {keys}). Set --data.text_field to the field "
            "holding the document text."
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise LMError(f"{where}: field {text_field!r} holds a {type(text).__name__} value, not text. Set "
                      "--data.text_field to the field holding the document text.")
    return text


def read_parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of a Parquet file, read one record batch at a time."""
    import pyarrow.parquet as pq  # installed with `datasets`

    if path.stat().st_size == 0:
        raise LMError(f"{path} is empty: remove it from the file list.")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid for a non-Parquet file
        raise LMError(f"{path} is not a readable Parquet file ({err}).") from err
    if text_field not in parquet.schema_arrow.names:
        raise LMError(
            f"{path} has no {text_field!r} column (it has: {parquet.schema_arrow.names}). Set "
            "--data.text_field to the column holding the document text."
        )
    column_type = parquet.schema_arrow.field(text_field).type
    if not _is_text_type(column_type):
        strings = [f.name for f in parquet.schema_arrow if _is_text_type(f.type)]
        raise LMError(
            f"{path}: column {text_field!r} holds {column_type} values, not text. Set --data.text_field to a column "
            f"of strings ({', '.join(repr(n) for n in strings) if strings else 'this file has none'})."
        )
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _is_text_type(arrow_type: Any) -> bool:
    """A Parquet column of strings (plain, large, or dictionary-encoded)."""
    import pyarrow as pa  # installed with `datasets`

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))


class TextSource(Protocol):
    """Something that streams documents and can say, cheaply, whether its content changed."""

    def fingerprint(self) -> dict[str, Any]: ...
    def describe(self) -> str: ...
    def documents(self) -> Iterator[str]: ...


@dataclass(frozen=True)
class FileSource:
    """Local files and globs: plain text, JSON lines or Parquet, chosen by suffix.

    Args:
        patterns: paths or glob patterns, in order.
        option: the CLI option that named them (for error messages).
        text_field: JSON field / Parquet column holding the text.
    """

    patterns: tuple[str, ...]
    option: str = "--data.train_files"
    text_field: str = "text"

    def files(self) -> list[Path]:
        return expand_paths(self.patterns, self.option)

    def fingerprint(self) -> dict[str, Any]:
        files = []
        for path in self.files():
            stat = path.stat()
            files.append({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return {"kind": "files", "files": files, "text_field": self.text_field}

    def describe(self) -> str:
        return ", ".join(self.patterns)

    def documents(self) -> Iterator[str]:
        for path in self.files():
            suffix = path.suffix.lower()
            if suffix in JSONL_SUFFIXES:
                yield from read_jsonl_documents(path, self.text_field)
            elif suffix in PARQUET_SUFFIXES:
                yield from read_parquet_documents(path, self.text_field)
            else:
                yield from read_text_documents(path)


@dataclass(frozen=True)
class HubSource:
    """A split of a Hugging Face dataset, read through ``datasets`` (which keeps its own download cache).

    Args:
        name: dataset path on the hub, e.g. ``Salesforce/wikitext``.
        config: dataset config (None: the default one).
        split: split name in the dataset (``train``, ``validation``, ...).
        text_field: the column holding the text.
        streaming: iterate rows over the network instead of downloading the split first.
    """

    name: str
    config: str | None
    split: str
    text_field: str = "text"
    streaming: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "hub", "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field}  # fmt: skip

    def describe(self) -> str:
        return f"hf://{self.name}/{self.config or 'default'}[{self.split}]"

    def documents(self) -> Iterator[str]:
        rows = (_text_of(row, self.text_field, f"{self.describe()} row {i}") for i, row in enumerate(self._rows()))
        if self.name == WIKITEXT_HUB_NAME:
            # One row per line, blank lines stored as "": rebuild the raw files' layout (" \n").
            yield from split_articles(row if row else " \n" for row in rows)
        else:
            yield from rows

    def _rows(self) -> Iterable[dict[str, Any]]:
        try:
            from datasets import load_dataset  # heavy import, only on this path

            return load_dataset(self.name, self.config, split=self.split, streaming=self.streaming)
        except Exception as err:  # offline: ConnectionError, OfflineModeIsEnabled, LocalEntryNotFound...
            raise LMError(
                f"Could not load {self.describe()} from the Hugging Face Hub: {type(err).__name__}: {err}\n"
                "If you are offline, use local files instead: --data.data_dir FOLDER (holding "
                f"{', '.join(WIKITEXT_FILES.values())}) or --data.train_files / --data.val_files / --data.test_files."
            ) from err


def wikitext_file(data_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(data_dir) / WIKITEXT_FILES[split]
