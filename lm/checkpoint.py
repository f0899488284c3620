"""Read `lm` checkpoints without a Trainer: the GPT, its config and its tokenizer.

A checkpoint written by `lm fit` is self-contained: `hyper_parameters["config"]` is the GPTConfig as a
plain dict, `tokenizer` is the tokenizer's JSON, and `state_dict` holds the weights under `model.`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from lm.errors import LMError, MissingFileError
from lm.model import GPT, GPTConfig


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"Checkpoint not found: {path}. `lm fit` writes them to checkpoints/<experiment>/ (last.ckpt and the best)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated / not a torch file
        raise LMError(f"Cannot read checkpoint {path}: {str(error).rstrip('.')}. Is it a complete checkpoint written by "
                         f"`lm fit` (a copy cut short, or another program's file, fails here)?") from error


# How `lm fit` names the stock LightningModule in `hyper_parameters["_class_path"]`.
_STOCK_CLASS_PATHS = {None, "lm.modules.LanguageModel", "lm.modules.language_model.LanguageModel"}


def import_class(class_path: str) -> type:
    """The class a checkpoint names in `hyper_parameters["_class_path"]` (a `LanguageModel` subclass)."""
    import importlib

    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise LMError(f"The checkpoint was trained with {class_path}, which cannot be imported ({error}): "
                         f"run from the directory of its package or add it to PYTHONPATH.") from error


def _build_network(hparams: dict[str, Any]) -> torch.nn.Module:
    """An untrained network of the checkpoint's architecture: a plain `GPT`, or, for a checkpoint of a
    `LanguageModel` subclass (`--model my_pkg.MyModel`), whatever its `build_model` returns (the
    subclass is imported and constructed from the saved hyper-parameters, which needs Lightning)."""
    class_path = hparams.get("_class_path")
    if class_path in _STOCK_CLASS_PATHS:
        return GPT(GPTConfig.from_dict(hparams["config"]))
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return import_class(class_path)(**init_args).model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return `(model, tokenizer)` from a checkpoint written by `lm fit`; the model is in eval mode.

    The model is the network the LightningModule trained (`LanguageModel.model`): a `GPT`, or what a
    subclass's `build_model` made."""
    from lm.data.tokenizer import Tokenizer

    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams or "tokenizer" not in checkpoint:
        raise LMError(f"{path} is not an `lm` language-model checkpoint (no model config or tokenizer in it).")
    model = _build_network(hparams)
    if hparams.get("quantization"):  # written by `lm quantize`: int8 modules before the int8 weights
        from lm.compress.quantize import quantize_model

        quantize_model(model, skeleton=True)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    return model, Tokenizer.from_str(checkpoint["tokenizer"])


def save_model(path: str | Path, model: torch.nn.Module, tokenizer, hparams: Optional[dict[str, Any]] = None,
               overwrite: bool = True) -> Path:
    """Write `model` and `tokenizer` as a checkpoint `load_model` reads (the layout `lm fit` writes,
    without training state): e.g. a fine-tuned model with its LoRA adapters merged, or the output of
    `lm quantize` / `lm prune`. `hparams` default to `{"config": model.config}`; a quantized or pruned
    model passes the source's, with its markers. Atomic: written to a temporary file, then renamed;
    with `overwrite=False` an existing file is an error instead."""
    import io

    from lm.files import atomic_write_bytes

    path = Path(path)
    if path.exists() and not overwrite:
        raise LMError(f"{path} already exists: choose another --output, or pass --overwrite true to replace it.")
    checkpoint = {"hyper_parameters": hparams if hparams is not None else {"config": model.config.to_dict()},
                  "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
                  "tokenizer": tokenizer.to_str()}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # shared (tied) tensors are stored once
    atomic_write_bytes(path, buffer.getvalue())
    return path
