"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one,
and checking an output folder before a long job writes into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Union

from lm.errors import LMError


def atomic_write_with(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, fsync it, then `os.replace` it onto `path`.

    Streams (a large checkpoint is never held twice in memory). `os.replace` is atomic on POSIX and
    Windows; a stray temporary file (`.<name>.*.tmp`) left by a kill is ignored by every reader. Any
    error (no space, no permission) is raised, never swallowed, and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """`atomic_write_with` of bytes already in memory."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def free_bytes(folder: Union[str, Path]) -> int:
    """Bytes free for an unprivileged writer on the file system holding `folder` (tests replace it)."""
    return shutil.disk_usage(folder).free


def check_writable_folder(folder: Union[str, Path], what: str, fix: str, need_bytes: int = 0) -> Path:
    """Make sure `folder` is (or can be made) a folder that accepts a new file, with `need_bytes` free.

    Run before a long job rather than discovering at its first save, hours later, that the folder is a
    file, read-only, immutable or full. `what` names the folder in the error ("checkpoint folder"),
    `fix` says how to choose another one ("--checkpoint.dirpath DIR"). Creates the folder."""
    folder = Path(folder)
    for existing in (folder, *folder.parents):  # the nearest part of the path that exists
        if existing.exists():
            if not existing.is_dir():
                raise LMError(f"The {what} {folder} cannot be created: {existing} is a file. Move or rename "
                              f"that file, or write elsewhere ({fix}).")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lm-write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise LMError(f"The {what} {folder} is not writable ({error.strerror}): fix its permissions, "
                      f"or write elsewhere ({fix}).") from error
    free = free_bytes(folder)
    if free < need_bytes:
        raise LMError(f"The {what} {folder} has {_size(free)} free, but this run's checkpoints need about "
                      f"{_size(need_bytes)}: free some space, or write elsewhere ({fix}).")
    return folder


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"
