"""Read `lm` checkpoints without a Trainer: the GPT, its config and its tokenizer.

A checkpoint written by `lm fit` is self-contained: `hyper_parameters["config"]` is the GPTConfig as a
plain dict, `tokenizer` is the tokenizer's JSON, and `state_dict` holds the weights under `model.`.

Safe loading: every checkpoint `lm` reads goes through `read_checkpoint`, i.e. `torch.load(weights_only=True)`
(tensors and plain values only; exports use safetensors), so loading a file never runs code. A file that
needs pickled Python objects, a truncated or corrupt one, weights that do not fit their own config, or
a tokenizer with more tokens than the model's vocabulary is an `LMError` saying which and what to do.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lm.compress.quantize import quantize_model
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError, MissingFileError
from lm.io.class_paths import import_class
from lm.io.files import atomic_write_bytes
from lm.model import GPT, GPTConfig, build_gpt
from lm.runtime.hardware import check_device


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as plain values and tensors (`torch.load(weights_only=True)`, memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        raise LMError(f"{path} is a folder, not a checkpoint file: pass a .ckpt file in it (e.g. {path / 'last.ckpt'}).")
    if not path.is_file():
        raise MissingFileError(
            f"Checkpoint not found: {path}. `lm fit` writes them to checkpoints/<experiment>/ (last.ckpt and the best)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:  # weights_only refused a Python object (a class, a function, ...)
        refused = re.search(r"(GLOBAL [\w.]+|Unsupported global: [^\n]+?)(?: was not|\.|$)", str(error))
        raise LMError(f"{path} holds pickled Python objects ({refused.group(1) if refused else 'not plain tensors'}), "
                      f"which lm never loads: unpickling can run arbitrary code. Re-save the weights as plain "
                      f"tensors (a state_dict) or use a checkpoint written by `lm fit`.") from error
    except Exception as error:  # truncated / corrupt / not a torch file
        raise LMError(f"Cannot read checkpoint {path}: {_first_line(error)}. The file is truncated, corrupt or not a "
                      f"torch checkpoint: copy it again or use another one (checkpoints/<experiment>/ keeps last and best).") from error
    if not isinstance(checkpoint, dict):
        raise LMError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict: pass a checkpoint written by `lm fit`.")
    return checkpoint


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def require_training_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`lm fit --ckpt_path` / validate / test / predict restore Lightning's training state: refuse, with
    the verb that reads it, a file that has none (a plain torch dict, or an `lm quantize|prune|merge` output)."""
    if "pytorch-lightning_version" in checkpoint and "state_dict" in checkpoint:
        return
    if "state_dict" in checkpoint and "hyper_parameters" in checkpoint and "tokenizer" in checkpoint:
        raise LMError(f"{path} holds weights only (written by lm quantize, prune or merge), no training state: evaluate "
                      f"or sample it with `lm eval` / `lm generate --ckpt_path {path}`, or train from it with --model.init_from.")
    keys = ", ".join(sorted(map(str, checkpoint))[:5]) or "nothing"
    raise LMError(f"{path} is not a checkpoint written by `lm fit` (it holds {keys}; no Lightning training state): "
                  f"pass one from checkpoints/<experiment>/, e.g. last.ckpt.")


# Where a checkpoint keeps the temperature folded into its weights and the tensors before the fold
# (lm/modules/temperature_calibration.py writes it; defined here so that reading a checkpoint imports no Lightning).
NETWORK_TEMPERATURE_KEY = "network_temperature"
# How `lm fit` names the stock LightningModule in `hyper_parameters["_class_path"]`.
_STOCK_CLASS_PATHS = {None, "lm.modules.LanguageModel", "lm.modules.language_model.LanguageModel"}


def _build_network(hparams: dict[str, Any]) -> torch.nn.Module:
    """An untrained network of the checkpoint's architecture: a plain `GPT`, or, for a checkpoint of a
    `LanguageModel` subclass (`--model my_pkg.MyModel`), whatever its `build_model` returns (the
    subclass is imported and constructed from the saved hyper-parameters, which needs Lightning)."""
    class_path = hparams.get("_class_path")
    if class_path in _STOCK_CLASS_PATHS:
        return build_gpt(GPTConfig.from_dict(hparams["config"]))
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return import_class(class_path)(**init_args).model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return `(model, tokenizer)` from a checkpoint written by `lm fit`; the model is in eval mode.

    The model is the network the LightningModule trained (`LanguageModel.model`): a `GPT`, or what a
    subclass's `build_model` made. Its `folded_temperature` is the softmax temperature training folded into the
    weights (`model.calibrate_temperature`, lm/modules/temperature_calibration.py), None when there is none."""
    device = check_device(device)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams or "tokenizer" not in checkpoint or "state_dict" not in checkpoint:
        raise LMError(f"{path} is not an `lm` language-model checkpoint (no model config, weights or tokenizer in it): "
                      f"pass one written by `lm fit` (checkpoints/<experiment>/last.ckpt).")
    model = _build_network(hparams)
    if hparams.get("quantization"):  # written by `lm quantize`: int8 modules before the int8 weights
        quantize_model(model, skeleton=True)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing / unexpected keys or shapes: the weights are not this config's
        problem = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), _first_line(error))
        raise LMError(f"{path}: its weights do not fit its own model config ({problem[:200]}): the file was altered or "
                      f"mixes two models. Use an unmodified checkpoint written by `lm fit`.") from error
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise LMError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}: they do "
                      f"not belong together (ids past {vocab_size - 1} have no embedding). Use the checkpoint as `lm fit` wrote it.")
    model.to(device=device, dtype=dtype).eval()
    model.folded_temperature = (checkpoint.get(NETWORK_TEMPERATURE_KEY) or {}).get("temperature")
    return model, tokenizer


def save_model(path: str | Path, model: torch.nn.Module, tokenizer, hparams: Optional[dict[str, Any]] = None,
               overwrite: bool = True) -> Path:
    """Write `model` and `tokenizer` as a checkpoint `load_model` reads (the layout `lm fit` writes,
    without training state): e.g. a fine-tuned model with its LoRA adapters merged, or the output of
    `lm quantize` / `lm prune`. `hparams` default to `{"config": model.config}`; a quantized or pruned
    model passes the source's, with its markers. Atomic: written to a temporary file, then renamed;
    with `overwrite=False` an existing file is an error instead."""
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
