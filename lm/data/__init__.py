"""Data layer: sources -> cleaning -> tokenizer -> sharded token cache -> windows -> the Lightning DataModule.

Rooms: plan.py (which split comes from where), sources.py, clean.py + dedup.py, tokenizer.py +
tokenizer_train.py, staging.py, encode.py, cache.py, prepare.py (all of it, no Lightning),
tokens.py (windows, samplers, resumable loader), litdata_chunks.py, datamodule.py (TextDataModule).

Exports are resolved lazily (PEP 562) so that ``from lm.data import Tokenizer`` costs only the
``tokenizers`` import, not torch + Lightning (~5 s): CLI verbs that only tokenize or print help stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm.data.datamodule import TextDataModule
    from lm.data.tokenizer import EOT, Tokenizer
    from lm.data.tokens import IGNORE_INDEX, EpochDistributedSampler, RandomWindowDataset, SequentialWindowDataset

_EXPORTS = {
    "EOT": "lm.data.tokenizer",
    "Tokenizer": "lm.data.tokenizer",
    "IGNORE_INDEX": "lm.data.tokens",
    "RandomWindowDataset": "lm.data.tokens",
    "SequentialWindowDataset": "lm.data.tokens",
    "EpochDistributedSampler": "lm.data.tokens",
    "TextDataModule": "lm.data.datamodule",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # next access skips this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
