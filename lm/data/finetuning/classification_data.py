"""`ClassificationDataModule`: labelled sentences for `SequenceClassifier` (lm/modules/classifier.py).

Two input layouts:
- `<label> <sentence>` lines (SST-2 `stsa.binary.{train,dev,test}`): `train_file`, `val_file`,
  `test_file`; without a `val_file` a seeded `val_fraction` of the training lines is held out;
- one file per class (rt-polarity: `rt-polarity.pos` / `.neg`, Latin-1, no split): `class_files`
  in label order, and a seeded split into train / val / test by `val_fraction` / `test_fraction`.

The tokenizer is the backbone's: the model hands it over in `setup` (`set_tokenizer`), so the
DataModule tokenizes lazily, when the first loader is built. Each sentence is followed by
`<|endoftext|>` (the pre-training document end), so last-token pooling always reads the same token
after the text; batches are right-padded, which under causal attention changes no real position.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from lm.errors import LMError, MissingFileError

Example = tuple[int, str]


def read_labelled_file(path: str | Path, encoding: str = "utf-8") -> list[Example]:
    """`<label> <sentence>` per line (integer label, then a space); empty lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Labelled file not found: {path}.")
    examples = []
    for number, line in enumerate(path.read_text(encoding=encoding).splitlines(), 1):
        if not line.strip():
            continue
        label, _, sentence = line.partition(" ")
        if not label.isdigit() or not sentence.strip():
            raise LMError(f"{path}:{number}: expected '<label> <sentence>' with an integer label, got {line[:60]!r}.")
        examples.append((int(label), sentence.strip()))
    return examples


def read_class_files(paths: list[str], encoding: str = "utf-8") -> list[Example]:
    """One sentence per line; the file's position in `paths` is its label."""
    examples = []
    for label, path in enumerate(paths):
        if not Path(path).is_file():
            raise MissingFileError(f"Class file not found: {path}.")
        lines = Path(path).read_text(encoding=encoding).splitlines()
        examples += [(label, line.strip()) for line in lines if line.strip()]
    return examples


def seeded_split(examples: list[Example], fractions: list[float], seed: int) -> list[list[Example]]:
    """Shuffle with `seed`, then cut off each fraction in turn; the rest comes first (train)."""
    if sum(fractions) >= 1 or any(f < 0 for f in fractions):
        raise LMError(f"Split fractions {fractions} must be >= 0 and sum to less than 1.")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    sizes = [int(round(f * len(shuffled))) for f in fractions]
    rest = len(shuffled) - sum(sizes)
    parts, start = [shuffled[:rest]], rest
    for size in sizes:
        parts.append(shuffled[start:start + size])
        start += size
    return parts


class TaskDataModule(L.LightningDataModule):
    """What the task DataModules share: the backbone's tokenizer and context arrive through
    `set_tokenizer` (from the model's `setup`, or the CLI from a `--ckpt_path` checkpoint)."""

    def __init__(self, max_length: Optional[int] = None) -> None:
        super().__init__()
        self.tokenizer = None
        self.max_length = max_length
        self.splits: dict[str, list] = {}

    @property
    def has_validation(self) -> bool:
        return True

    def set_tokenizer(self, tokenizer, max_length: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        if max_length is not None:  # the model's context bounds what the data may ask for
            self.max_length = min(self.hparams.max_length or max_length, max_length)


class ClassificationDataModule(TaskDataModule):
    """Labelled sentences as right-padded token batches: (input_ids, lengths, labels).

    Args:
        train_file: `<label> <sentence>` training lines.
        val_file: Validation lines (default: `val_fraction` of train_file, seeded).
        test_file: Test lines.
        class_files: Instead of the three files: one file of sentences per class, label = position
            (e.g. [rt-polarity.neg, rt-polarity.pos]); split by val_fraction / test_fraction.
        encoding: Text encoding of the files (rt-polarity is latin-1).
        val_fraction: Share held out for validation when there is no val_file.
        test_fraction: Share held out for testing with class_files.
        split_seed: Seed of the held-out splits (fixed across runs so runs compare).
        batch_size: Sentences per batch.
        max_length: Longest sentence in tokens (default: the backbone's context; longer ones keep
            their first tokens).
        max_train_examples: Use only this many training sentences (short runs).
    """

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, class_files: Optional[list[str]] = None,
                 encoding: str = "utf-8", val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 1234, batch_size: int = 32, max_length: Optional[int] = None,
                 max_train_examples: Optional[int] = None) -> None:
        super().__init__(max_length)
        if not (train_file or class_files):
            raise LMError("No data: pass --data.init_args.train_file (<label> <sentence> lines) or class_files.")
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        hp = self.hparams
        if hp.class_files:
            train, val, test = seeded_split(read_class_files(hp.class_files, hp.encoding),
                                            [hp.val_fraction, hp.test_fraction], hp.split_seed)
        else:
            train = read_labelled_file(hp.train_file, hp.encoding) if hp.train_file else []
            test = read_labelled_file(hp.test_file, hp.encoding) if hp.test_file else []
            if hp.val_file:
                val = read_labelled_file(hp.val_file, hp.encoding)
            else:
                train, val = seeded_split(train, [hp.val_fraction], hp.split_seed)
        if hp.max_train_examples:
            train = train[:hp.max_train_examples]
        self.splits = {"train": train, "val": val, "test": test}

    @property
    def num_classes(self) -> int:
        return 1 + max(label for examples in self.splits.values() for label, _ in examples)

    def collate(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return encode_sentences(self.tokenizer, [text for _, text in examples], self.max_length) + (
            torch.tensor([label for label, _ in examples]),)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if self.tokenizer is None:
            raise LMError("ClassificationDataModule has no tokenizer: the model hands it over in setup().")
        if not self.splits.get(split):
            raise LMError(f"No {split} examples: give the {split} file (or class_files) in the data settings.")
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def encode_sentences(tokenizer, texts: list[str], max_length: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and lengths (B,): each text's tokens (at most max_length - 1) + end-of-text."""
    eot = tokenizer.eot_id
    suffix = [eot] if eot is not None else []
    limit = (max_length - len(suffix)) if max_length else None
    rows = [ids[:limit] + suffix for ids in tokenizer.encode_batch(texts)]
    lengths = torch.tensor([max(len(r), 1) for r in rows])
    batch = torch.full((len(rows), int(lengths.max())), eot if eot is not None else 0, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return batch, lengths
