"""Write an export folder all at once: files go to a temporary sibling folder, which then takes the
target's place in one atomic step, so an interrupted export never leaves a half-written folder (nor
destroys an older one).

`--overwrite` replaces an earlier export, never anything else: each export lists the files it wrote in
`.lm-export.json`, and a folder holding any other file (a user's notes, their own config.json) is refused
with the names. The folder and its files get the permissions the user's umask gives a new file (not
the 0700 / 0600 of a private temporary folder), so a colleague or a non-root container can read them."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm.errors import LMError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
MANIFEST = ".lm-export.json"  # the files an export wrote: what a later --overwrite may replace


def write_folder(target: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(tmp_dir)` to write the files, then move them to `target` (a new folder, or an earlier
    export when `overwrite`)."""
    target = Path(target)
    _recover_interrupted_swap(target)
    if target.exists():
        if not overwrite:
            raise LMError(f"{target} already exists: choose another --output, or pass --overwrite true.")
        _check_replaceable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as error:
        raise LMError(f"Cannot write the export next to {target}: {error.strerror} ({target.parent}). "
                      f"Choose an --output in a folder you can write to.") from error
    try:
        fill(tmp)
        write_json(tmp / MANIFEST, {"files": sorted(p.name for p in tmp.iterdir())})
        _permissions_of_a_new_file(tmp)
        if not target.exists():
            tmp.rename(target)
        elif _exchange(tmp, target):  # tmp now holds the old folder
            shutil.rmtree(tmp)
        else:  # no atomic exchange here: two renames, undone by the next export if a kill falls between them
            old = _old_name(target)
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    """An existing --output may be replaced only if it is an earlier export with nothing added to it."""
    if not target.is_dir():
        raise LMError(f"{target} exists and is not a folder: choose another --output.")
    present = {p.name for p in target.iterdir()}
    try:
        written = set(json.loads((target / MANIFEST).read_text(encoding="utf-8"))["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        written = set()  # not an lm export (or one from before the manifest): every file is someone else's
    others = sorted(present - written)
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise LMError(f"{target} holds files this export did not write ({shown}): --overwrite replaces an earlier "
                      f"export, never other files. Choose another --output, or move those files out first.")


def _permissions_of_a_new_file(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it, and every file in it, what the umask gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _recover_interrupted_swap(target: Path) -> None:
    """A kill between the two renames of the fallback left the previous export as `.<name>.old` and no
    `<name>`: put it back."""
    old = _old_name(target)
    if old.is_dir() and not target.exists():
        old.rename(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(error, os.strerror(error), str(b))


def write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
