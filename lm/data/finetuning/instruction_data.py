"""`InstructionDataModule`: Alpaca-format JSON (instruction / input / output) for instruction tuning.

The file is a JSON list, or JSON lines with a `.jsonl` name (what `lm serve` writes as feedback).

- prompt = the `alpaca` template (lm/data/finetuning/templates.py), response = output + `<|endoftext|>` (so the
  model learns to stop);
- labels are -100 on every prompt token: the loss is on the response only;
- examples longer than the context keep the whole prompt if they can and cut the response (an
  example whose prompt alone fills the context is dropped, and counted in the log);
- batches are right-padded (pad labels -100). Under causal attention a real token never sees the
  padding after it, so no attention mask is needed and the logits of real tokens equal an unpadded
  run's (tested);
- a seeded `val_fraction` (default 10%) is held out: it is the validation split and the set BLEU /
  ROUGE are measured on (`held_out_pairs`: the rows `lm eval --pairs_file` reads, see docs/evaluation.md).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from lm.data.finetuning.classification_data import TaskDataModule
from lm.data.finetuning.templates import alpaca_prompt
from lm.errors import LMError, MissingFileError
from lm.evaluation.token_losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


def read_alpaca(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Alpaca JSON not found: {path}.")
    text = path.read_text(encoding="utf-8")
    try:  # a JSON list (Alpaca), or JSON lines (e.g. `lm serve`'s feedback file, one example per line)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as error:
        raise LMError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {error}.") from error
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in rows):
        raise LMError(f"{path}: expected a JSON list of {{instruction, input, output}} objects (Alpaca format).")
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]


def split_examples(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded shuffle, the last `val_fraction` held out."""
    if not 0 < val_fraction < 1:
        raise LMError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = len(rows) - max(1, round(val_fraction * len(rows)))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def encode_example(tokenizer, row: dict, max_length: int) -> Optional[tuple[list[int], list[int]]]:
    """(input ids, labels) with labels -100 on the prompt, or None if the prompt fills the context.
    Inputs are the first n-1 tokens of prompt + response + eot, labels the next tokens."""
    prompt = tokenizer.encode(alpaca_prompt(row["instruction"], row["input"]))
    response = tokenizer.encode(row["output"]) + [tokenizer.eot_id]
    ids = (prompt + response)[:max_length + 1]
    if len(prompt) >= len(ids):
        return None
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]
    return ids[:-1], labels


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(pairs):
        inputs[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(labs)] = torch.tensor(labs)
    return inputs, labels


class InstructionDataModule(TaskDataModule):
    """Alpaca JSON -> (input_ids, labels) batches with the prompt masked.

    Args:
        data_file: JSON list of {instruction, input, output} objects.
        val_fraction: Held-out share (validation, and the BLEU / ROUGE set).
        split_seed: Seed of the held-out split.
        batch_size: Examples per batch.
        max_length: Longest example in tokens (default: the backbone's context).
    """

    def __init__(self, data_file: str, val_fraction: float = 0.1, split_seed: int = 1234, batch_size: int = 8,
                 max_length: Optional[int] = None) -> None:
        super().__init__(max_length)
        self.save_hyperparameters()

    def set_tokenizer(self, tokenizer, max_length: Optional[int] = None) -> None:
        if tokenizer.eot_id is None:
            raise LMError("Instruction tuning needs a tokenizer with <|endoftext|> (to end answers).")
        super().set_tokenizer(tokenizer, max_length)

    def setup(self, stage: str) -> None:
        if not self.splits:
            train, held_out = split_examples(read_alpaca(self.hparams.data_file), self.hparams.val_fraction,
                                             self.hparams.split_seed)
            self.splits = {"train": train, "val": held_out}

    def held_out_pairs(self) -> list[dict[str, str]]:
        """The held-out examples as `lm eval --pairs_file` rows."""
        self.setup("fit")
        return [dict(row) for row in self.splits["val"]]

    def _encoded(self, split: str) -> list[tuple[list[int], list[int]]]:
        if self.tokenizer is None:
            raise LMError("InstructionDataModule has no tokenizer: the model hands it over in setup().")
        encoded = [encode_example(self.tokenizer, row, self.max_length) for row in self.splits[split]]
        dropped = sum(e is None for e in encoded)
        if dropped:
            logger.info("%s: dropped %d examples whose prompt alone fills the %d-token context.", split, dropped,
                        self.max_length)
        return [e for e in encoded if e is not None]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self._encoded(split), batch_size=self.hparams.batch_size, shuffle=shuffle,
                          collate_fn=lambda pairs: pad_batch(pairs, self.tokenizer.eot_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
