"""Data layer: sources -> cleaning -> tokenizer -> sharded token cache -> windows -> the Lightning DataModule.

Three jobs, three rooms, and what they share beside them:

- `tokenizer.py` + `tokenizer_training.py`: the tokenizer and how each kind is trained;
- `token_cache.py`: the sharded token cache, written by preparation and read by loading;
- `preparation/`: offline, no Lightning: sources -> cleaning -> tokenizer -> token cache + report;
- `loading/`: training-time windows, samplers and the `TextDataModule`;
- `finetuning/`: instruction and classification datasets and their prompt templates.

Exports are resolved lazily (PEP 562) so that ``from lm.data import Tokenizer`` costs only the
``tokenizers`` import, not torch + Lightning (~5 s): CLI verbs that only tokenize or print help stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm.data.finetuning.classification_data import ClassificationDataModule
    from lm.data.finetuning.instruction_data import InstructionDataModule
    from lm.data.loading.datamodule import TextDataModule
    from lm.data.tokenizer import EOT, Tokenizer
    from lm.data.loading.windows import IGNORE_INDEX, EpochDistributedSampler, RandomWindowDataset, SequentialWindowDataset

_EXPORTS = {
    "EOT": "lm.data.tokenizer",
    "Tokenizer": "lm.data.tokenizer",
    "IGNORE_INDEX": "lm.data.loading.windows",
    "RandomWindowDataset": "lm.data.loading.windows",
    "SequentialWindowDataset": "lm.data.loading.windows",
    "EpochDistributedSampler": "lm.data.loading.windows",
    "TextDataModule": "lm.data.loading.datamodule",
    "ClassificationDataModule": "lm.data.finetuning.classification_data",
    "InstructionDataModule": "lm.data.finetuning.instruction_data",
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
