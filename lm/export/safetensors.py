"""`lm export --format safetensors`: the model as plain files any runtime can read.

    folder/model.safetensors   weights under the GPT's state-dict names (a tied matrix stored once)
    folder/config.json         the GPTConfig fields
    folder/tokenizer.json      the Hugging Face `tokenizers` file of the model's BPE

`load_folder(folder)` reads it back as `(GPT, Tokenizer)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from lm.data.tokenizer import Tokenizer
from lm.errors import MissingFileError
from lm.export.folder import write_json, write_folder
from lm.model import GPT, GPTConfig, build_gpt


def export_safetensors(model: GPT, tokenizer, output: str | Path, overwrite: bool = False) -> Path:
    def fill(folder: Path) -> None:
        save_model(model, str(folder / "model.safetensors"))  # drops the tied duplicate, keeps one name
        write_json(folder / "config.json", model.config.to_dict())
        (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")

    return write_folder(output, fill, overwrite)


def load_folder(folder: str | Path) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` from a folder written by `export_safetensors`; the model is in eval mode."""
    folder = Path(folder)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder / name} not found: is {folder} a folder written by `lm export --format safetensors`?")
    model = build_gpt(GPTConfig.from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8"))))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval(), Tokenizer.from_file(folder / "tokenizer.json")
