"""Write an export folder all at once: files go to a temporary sibling folder, which then takes the
target's place in one atomic step, so an interrupted export never leaves a half-written folder (nor
destroys an older one)."""

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


def write_folder(target: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(tmp_dir)` to write the files, then move them to `target` (a new folder, or an existing
    one when `overwrite`)."""
    target = Path(target)
    _recover_interrupted_swap(target)
    if target.exists() and not overwrite:
        raise LMError(f"{target} already exists: choose another --output, or pass --overwrite true.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
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
