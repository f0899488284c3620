"""Write an export folder all at once: files go to a temporary sibling folder, which then replaces
the target, so an interrupted export never leaves a half-written folder (nor destroys an older one)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm.errors import LMError


def write_folder(target: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(tmp_dir)` to write the files, then move them to `target` (a new folder, or an existing
    one when `overwrite`)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise LMError(f"{target} already exists: choose another --output, or pass --overwrite true.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
