"""Checks `lm fit|validate|test|predict` makes once the config is parsed, before anything runs or is written.

Each one catches a mistake that used to run to the end silently or fail late with a traceback:
- `checked_ckpt_path`: a missing `--ckpt_path`, or a folder given where a checkpoint file belongs;
- `check_run_folders`: validate/test/predict without a checkpoint (random weights, unless
  `--random_weights true` says so), an empty or escaping `--experiment` name, and a new `lm fit`
  into a checkpoint folder that already holds checkpoints (its `last.ckpt` would go stale);
- `check_context`: `data.block_size` longer than the model's context (found at the first forward pass
  otherwise, with advice about prompts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lm.errors import LMError, MissingFileError


def checked_ckpt_path(ckpt_path: Optional[str], subcommand: str) -> bool:
    """True if `ckpt_path` is a checkpoint file to read; False for none or a sharded checkpoint folder
    (a distributed checkpoint, read by its strategy). A missing path or another folder is an `LMError`."""
    if not ckpt_path:
        return False
    path = Path(ckpt_path)
    if path.is_dir():
        if (path / ".metadata").is_file() or (path / "meta.pt").is_file():
            return False
        inside = sorted(p.name for p in path.glob("*.ckpt"))[:3]
        example = f" e.g. {path / inside[0]}" if inside else ""
        raise LMError(f"--ckpt_path {path} is a folder, not a checkpoint file: pass a file in it,{example or ' e.g. last.ckpt'} "
                      f"({', '.join(inside) or 'it holds no .ckpt file'}).")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint not found: {path}. Runs write them to checkpoints/<experiment>/ "
                               f"(last.ckpt and the best); `lm {subcommand} --ckpt_path checkpoints/<experiment>/last.ckpt`.")
    return True


def check_run_folders(subcommand: Optional[str], config: Any) -> None:
    """The experiment name, the checkpoint a non-fit verb needs, and a fit that would reuse a folder."""
    name = config.get("experiment")
    if name is not None:
        _check_experiment_name(str(name))
    if subcommand in ("validate", "test", "predict") and not config.get("ckpt_path") and not config.get("random_weights"):
        raise LMError(f"lm {subcommand} needs --ckpt_path (a checkpoint of `lm fit`, e.g. checkpoints/<experiment>/last.ckpt): "
                      f"without one it would use random weights. For a random-weights baseline pass --random_weights true.")
    if subcommand == "fit" and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # DDP children re-run the command
        dirpath = (config.get("checkpoint") or {}).get("dirpath") or f"checkpoints/{name}"
        _check_fresh_checkpoint_folder(Path(dirpath), config.get("ckpt_path"), name)


def _check_experiment_name(name: str) -> None:
    if not name.strip():
        raise LMError("--experiment is empty: name the run, e.g. --experiment my_run (logs go to logs/<name>, "
                      "checkpoints to checkpoints/<name>).")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise LMError(f"--experiment {name!r} would write outside logs/ and checkpoints/: use a plain name such as my_run.")


def _check_fresh_checkpoint_folder(dirpath: Path, ckpt_path: Optional[str], name: str) -> None:
    """A second `lm fit --experiment X` would write `last-v1.ckpt` beside the old `last.ckpt`, which then
    silently names the old model: refuse unless the run resumes from a checkpoint of that folder."""
    existing = sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
    if not existing:
        return
    if ckpt_path == "last" or (ckpt_path and Path(ckpt_path).resolve().parent == dirpath.resolve()):
        return
    raise LMError(f"{dirpath}/ already holds checkpoints of an earlier run ({', '.join(existing[:3])}): resume it with "
                  f"--ckpt_path last, or start a new run with another --experiment name (or delete {dirpath}/ first).")


def check_context(model: Any, datamodule: Any, from_checkpoint: bool) -> None:
    """`data.block_size` must fit in the model's context (`model.config.max_position_embeddings`)."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    block_size = getattr(datamodule, "block_size", None)
    if not isinstance(context, int) or not isinstance(block_size, int) or block_size <= context:
        return
    fix = "" if from_checkpoint else " or raise --model.config.max_position_embeddings"
    source = " (the checkpoint's)" if from_checkpoint else ""
    raise LMError(f"data.block_size={block_size} is longer than the model's context, model.config.max_position_embeddings="
                  f"{context}{source}: lower --data.block_size to at most {context}{fix}.")
