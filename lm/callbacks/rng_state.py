"""`RNGStateCheckpoint`: random generator states in every checkpoint, restored when training resumes.

Lightning checkpoints weights, optimizer, schedulers and loop positions but not the random generators,
and dropout (and anything else sampling during training) needs them for a resumed run to continue
exactly as an uninterrupted one. `lm fit` adds this callback by default.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

CHECKPOINT_KEY = "rng_states"


class RNGStateCheckpoint(Callback):
    """Saves Python, NumPy and torch (CPU, CUDA) generator states under `checkpoint["rng_states"]`.

    They are applied when training starts (`on_train_start`), after everything that runs between
    loading the checkpoint and the first batch (the sanity validation, ...). In a multi-process run the
    checkpoint holds rank 0's states and every rank restores them, which is exact because Lightning
    seeds all ranks alike (`seed_everything`), so their generators advance in lock step.
    """

    def __init__(self) -> None:
        self._to_restore: Optional[dict[str, Any]] = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = rng_states()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get(CHECKPOINT_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._to_restore = self._to_restore, None
        if states:
            set_rng_states(states)


def rng_states() -> dict[str, Any]:
    """The generator states, as types `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
