"""Checks `lm fit|validate|test|predict` makes once the config is parsed, before anything runs or is written.

Each one catches a mistake that used to run to the end silently or fail late with a traceback:
- `checked_ckpt_path`: a missing `--ckpt_path`, or a folder given where a checkpoint file belongs;
- `check_run_folders`: validate/test/predict without a checkpoint (random weights, unless
  `--random_weights true` says so), an empty or escaping `--experiment` name, and a new `lm fit`
  into a checkpoint folder that already holds checkpoints (its `last.ckpt` would go stale);
- `refuse_block_size`: `data.block_size` given on the command line or in a YAML file. `lm fit` cuts its
  windows at the model's context, `model.config.max_position_embeddings` (a jsonargparse link), so the
  context is stated once; jsonargparse itself refuses the flag with a bare message and drops a YAML
  value without a word.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from lm.cli.config_errors import config_files
from lm.errors import LMError, MissingFileError

CONTEXT_KEY = "model.config.max_position_embeddings"  # the source of the link; data.block_size its target


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


def refuse_block_size(args: list[str]) -> None:
    """An `LMError` naming `model.config.max_position_embeddings` if `args` (a command line) or a YAML file
    it passes to `--config` or `--data` sets `data.block_size`, which `lm fit` takes from the model."""
    given = _block_sizes_given(args)
    if given:
        where, value = given[0]
        example = value if isinstance(value, int) and not isinstance(value, bool) else "N"
        raise LMError(f"data.block_size is set {where}, but lm cuts its windows at the model's context: state it "
                      f"once, as {CONTEXT_KEY} (e.g. --{CONTEXT_KEY} {example}), and drop data.block_size.")


def _block_sizes_given(args: list[str]) -> list[tuple[str, Any]]:
    """(where, value) of each `data.block_size` the arguments set: a flag, a config file, a `--data` value."""
    found: list[tuple[str, Any]] = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--data.block_size", "--data.init_args.block_size"):
            given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            found.append(("on the command line", int(given) if given.isdigit() else given))
        elif name == "--data" and (eq or i + 1 < len(args)):
            given = value if eq else args[i + 1]
            text, where = _read(given), f"in {given}"
            if text is None:
                text, where = given, "in --data"
            data = _load_yaml(text)
            if isinstance(data, dict) and _data_block_size(data) is not None:
                found.append((where, _data_block_size(data)))
    for path in config_files(args):
        recipe = _load_yaml(_read(path) or "")
        data = recipe.get("data") if isinstance(recipe, dict) else None
        if isinstance(data, dict) and _data_block_size(data) is not None:
            found.append((f"in {path}", _data_block_size(data)))
    return found


def _read(path: str) -> Optional[str]:
    """The text of the file `path`, or None if it is no readable file (a value given inline)."""
    try:
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    except (OSError, UnicodeDecodeError):
        return None  # the parser reports an unreadable file


def _data_block_size(data: dict) -> Any:
    init_args = data.get("init_args")
    return data.get("block_size", init_args.get("block_size") if isinstance(init_args, dict) else None)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        return None  # a broken file is reported by the parser, with its line and column
