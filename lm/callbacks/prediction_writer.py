"""`PredictionWriter`: `lm predict` writes every completion as one JSON line and echoes it."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from lm.io.files import atomic_write_text


class PredictionWriter(BasePredictionWriter):
    """Writes `{prompt, completion}` JSON lines to `output_path` (one file per rank when several) and
    prints them."""

    def __init__(self, output_path: str) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        path = self.output_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}.jsonl")
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for row in rows:
            print(f"\n>>> {row['prompt']}\n{row['completion']}")
        print(f"\nWrote {len(rows)} completions to {path}")
