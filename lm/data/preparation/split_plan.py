"""Which split comes from where: a plain plan made from the data settings, before any data is read.

Priority, per split:

* ``train_files`` / ``val_files`` / ``test_files``: files or globs (text, JSONL, Parquet);
* else ``data_dir``: a folder in WikiText layout (``wiki.train.raw``, ``wiki.valid.raw``,
  ``wiki.test.raw``; validation and test optional);
* else, when no local path is given at all, a Hugging Face dataset (``hub_name`` / ``hub_config``,
  the WikiText-2 preset by default), optionally streamed.

With ``val_fraction > 0`` the validation split is carved off the end of the cleaned training text
instead (see :func:`lm.data.preparation.staging.carve_tail`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm.data.preparation.sources import FileSource, HubSource, TextSource, wikitext_file
from lm.errors import LMError, MissingFileError

SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
# Which splits each Trainer entry point needs (None: used without a Trainer, prepare everything).
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val", "test"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
    None: ("train", "val", "test"),
}


def file_list(files: Sequence[str] | str | None) -> list[str] | None:
    """One path or a list of paths (``--data.train_files a.txt`` or ``[a.txt, b.txt]``) as a list."""
    if not files:
        return None
    return [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


@dataclass
class DataPlan:
    """Sources per split, and whether validation is carved off the training text."""

    sources: dict[str, TextSource] = field(default_factory=dict)
    val_fraction: float = 0.0

    @property
    def carved(self) -> bool:
        return self.val_fraction > 0

    def has_split(self, split: str) -> bool:
        if split == "val" and self.carved:
            return "train" in self.sources
        return split in self.sources

    def source(self, split: str) -> TextSource:
        """Where ``split``'s text comes from (the training source for a carved validation split)."""
        name = "train" if split == "val" and self.carved else split
        if name not in self.sources:
            raise LMError(f"No source for the {split} split.")
        return self.sources[name]

    def splits_for(self, stage: str | None) -> list[str]:
        """The splits ``stage`` needs that this plan has; a clear error when a needed one is missing."""
        if stage not in STAGE_SPLITS:
            raise LMError(f"Unknown stage {stage!r}; expected one of {sorted(s for s in STAGE_SPLITS if s)}.")
        splits = [s for s in STAGE_SPLITS[stage] if self.has_split(s)]
        if stage == "fit" and "train" not in splits:
            raise LMError(
                "No training data: pass --data.train_files [...], --data.data_dir (with wiki.train.raw), or no "
                "local paths at all to download WikiText from the Hub."
            )
        if stage in ("validate", "test") and STAGE_SPLITS[stage][0] not in splits:
            needed = STAGE_SPLITS[stage][0]
            option = "--data.val_files or --data.val_fraction" if needed == "val" else "--data.test_files"
            raise LMError(f"No {needed} data for `{stage}`: pass {option}.")
        return splits


def make_plan(
    *, data_dir: str | None, files: dict[str, list[str] | None], hub_name: str, hub_config: str | None,
    hub_streaming: bool = False, text_field: str = "text", val_fraction: float = 0.0,
) -> DataPlan:  # fmt: skip
    """The plan for these settings (``files`` maps split -> file list or None)."""
    if not 0.0 <= val_fraction < 1.0:
        raise LMError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if val_fraction > 0 and files.get("val"):
        raise LMError("Pass either val_files or val_fraction > 0, not both.")
    plan = DataPlan(val_fraction=val_fraction)
    local = bool(data_dir or any(files.values()))
    for split in SPLITS:
        if split == "val" and val_fraction > 0:
            continue
        option = f"--data.{split}_files"
        if files.get(split):
            plan.sources[split] = FileSource(tuple(files[split] or ()), option=option, text_field=text_field)
        elif data_dir:
            path = wikitext_file(_checked_dir(data_dir), split)
            if split == "train" or path.is_file():  # a missing training file is reported when it is read
                plan.sources[split] = FileSource((str(path),), option=option)
        elif not local:
            plan.sources[split] = HubSource(hub_name, hub_config, HUB_SPLITS[split], text_field, hub_streaming)
    return plan


def _checked_dir(data_dir: str) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise MissingFileError(
            f"data_dir not found: {path}. It should hold WikiText's wiki.train.raw, wiki.valid.raw and "
            "wiki.test.raw (download WikiText-2 raw from https://huggingface.co/datasets/Salesforce/wikitext), "
            "or pass files with --data.train_files / --data.val_files / --data.test_files."
        )
    return path
