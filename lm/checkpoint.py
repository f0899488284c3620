"""Read `lm` checkpoints without a Trainer: the GPT, its config and its tokenizer.

A checkpoint written by `lm fit` is self-contained: `hyper_parameters["config"]` is the GPTConfig as a
plain dict, `tokenizer` is the tokenizer's JSON, and `state_dict` holds the weights under `model.`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lm.model import GPT, GPTConfig


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint not found: {path}. `lm fit` writes them to checkpoints/<experiment>/ (last.ckpt and the best)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated / not a torch file
        raise ValueError(f"Cannot read checkpoint {path}: {error}") from error


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return `(model, tokenizer)` from a checkpoint written by `lm fit`; the model is in eval mode."""
    from lm.data.tokenizer import Tokenizer

    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams or "tokenizer" not in checkpoint:
        raise ValueError(f"{path} is not an `lm` language-model checkpoint (no model config or tokenizer in it).")
    model = GPT(GPTConfig.from_dict(hparams["config"]))
    prefix = "model."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()
             if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    return model, Tokenizer.from_str(checkpoint["tokenizer"])
