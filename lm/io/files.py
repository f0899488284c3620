"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one;
checking an output folder before a long job writes into it; and the locks that keep two processes
from writing the same outputs at once.

Locks are `flock`s on small lock files (`try_lock`, `wait_lock`): the kernel releases one when its
process ends, however it ends (a crash or `kill -9` never leaves a stale lock), and a lock file holds
its holder's pid, command and start time so the process that cannot get it can say who has it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

from lm.errors import LMError

try:
    import fcntl
except ImportError:  # Windows: no flock; locks are not taken there
    fcntl = None  # type: ignore[assignment]


def atomic_write_with(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, fsync it, then `os.replace` it onto `path`.

    Streams (a large checkpoint is never held twice in memory). `os.replace` is atomic on POSIX and
    Windows; a stray temporary file (`.<name>.*.tmp`) left by a kill is ignored by every reader. Any
    error (no space, no permission) is raised, never swallowed, and leaves `path` as it was."""
    path = Path(path)
    blocker = path if path.is_dir() else _file_in_the_way(path.parent)
    if blocker is not None:  # a user's path mistake, said in one line (other OS errors stay OSErrors)
        kind = "a folder" if blocker.is_dir() else "a file, not a folder"
        raise LMError(f"Cannot write {path}: {blocker} is {kind}. Move or rename it, or write elsewhere.")
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
    folder = _make_folder(Path(folder), what, fix)
    try:
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


def check_folder_path(folder: Union[str, Path], what: str, fix: str) -> Path:
    """`folder` exists as a folder or can be created (no part of its path is a file); nothing is created."""
    folder = Path(folder)
    existing = _file_in_the_way(folder)
    if existing is not None:
        raise LMError(f"The {what} {folder} cannot be created: {existing} is a file. Move or rename "
                      f"that file, or write elsewhere ({fix}).")
    return folder


def _file_in_the_way(folder: Path) -> Optional[Path]:
    """The nearest existing part of `folder`'s path, if it is not a folder (a file in the way)."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            return None if existing.is_dir() else existing
    return None


def _make_folder(folder: Path, what: str, fix: str) -> Path:
    check_folder_path(folder, what, fix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LMError(f"The {what} {folder} is not writable ({error.strerror}): fix its permissions, "
                      f"or write elsewhere ({fix}).") from error
    return folder


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


# ----------------------------------------------------------------------------------------------- locks
def try_lock(path: Union[str, Path], command: str = "") -> Optional[int]:
    """An exclusive lock on the lock file `path` (created with its folder), or None if another process
    holds it. Returns the open file descriptor, which *is* the lock: keep it open while the lock is
    needed, `release_lock` it, or let the process end. The file then names this process (`lock_holder`)."""
    if fcntl is None:
        return -1  # no flock on this platform: nothing to hold
    fd = _open_lock_file(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    _write_holder(fd, command)
    return fd


def wait_lock(path: Union[str, Path], command: str = "",
              on_wait: Optional[Callable[[dict[str, Any]], None]] = None) -> int:
    """`try_lock`, and if another process holds the lock, call `on_wait(its lock_holder record)` once and
    wait until it ends or releases it."""
    fd = try_lock(path, command)
    if fd is not None:
        return fd
    if on_wait is not None:
        on_wait(lock_holder(path))
    fd = _open_lock_file(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    _write_holder(fd, command)
    return fd


def release_lock(fd: int) -> None:
    """Give up a lock of `try_lock` / `wait_lock`."""
    if fd >= 0:
        os.close(fd)  # closing the last descriptor of the open file releases its flock


def lock_holder(path: Union[str, Path]) -> dict[str, Any]:
    """What the lock file `path` says of the process holding it: pid, host, command, started (local time);
    {} when unreadable (e.g. the holder has not written it yet)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """The holder in one phrase, e.g. `lm fit, pid 1234, started 2025-05-01 10:00:00` (and its host, when
    another machine holds the lock)."""
    parts = [holder["command"]] if holder.get("command") else []
    parts.append(f"pid {holder.get('pid', 'unknown')}")
    if holder.get("host") and holder["host"] != socket.gethostname():
        parts.append(f"on host {holder['host']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    return ", ".join(parts)


def _open_lock_file(path: Path) -> int:
    _make_folder(path.parent, "lock folder", "choose another output path")
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    except PermissionError as error:
        if path.is_file():
            return os.open(path, os.O_RDONLY)  # another user's lock file: flock works on a read-only descriptor
        raise LMError(f"Cannot create the lock file {path} ({error.strerror}): fix the permissions of "
                      f"{path.parent}, or write elsewhere.") from error


def _write_holder(fd: int, command: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _this_command(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except OSError:
        pass  # a read-only lock file: the lock holds, only its holder goes unnamed


def _this_command() -> str:
    """What this process runs, for its locks: `lm fit` (also under `python -m lm`), else the program's name."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name
    verb = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and name == "lm" else ""
    return f"{name} {verb}".strip()
