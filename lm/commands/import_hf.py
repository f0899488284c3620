"""`lm import`: a local Hugging Face GPT-2 or Llama folder as an `lm` checkpoint (the conversion is
lm/io/hf_import.py; the inverse of `lm export --format hf`).

    hf download gpt2 --local-dir hf/gpt2        # or, older huggingface_hub: huggingface-cli download ...
    lm import --hf_folder hf/gpt2 --output checkpoints/gpt2.ckpt --recipe checkpoints/gpt2.yaml
    lm generate --ckpt_path checkpoints/gpt2.ckpt --prompt "The river"
    lm fit --config checkpoints/gpt2.yaml --data.train_files '[my.txt]' --experiment gpt2_more
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from lm.errors import LMError
from lm.io.checkpoints import save_model
from lm.io.files import atomic_write_text
from lm.io.hf_import import load_hf_folder
from lm.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_hf(hf_folder: Optional[str] = None, output: Optional[str] = None, overwrite: bool = False,
              dtype: Literal["float32", "bfloat16", "float16"] = "float32", recipe: Optional[str] = None) -> None:
    """Convert a local Hugging Face GPT-2 or Llama folder into an `lm` checkpoint.

    The checkpoint holds the GPTConfig, the weights and the tokenizer, like one `lm fit` writes: `lm generate`,
    `eval`, `serve`, `quantize`, `finetune` (as the backbone) and `fit --model.init_from` read it.

    Args:
        hf_folder: A local folder with config.json, model.safetensors (or pytorch_model.bin, or sharded with
            an index.json) and tokenizer.json, e.g. `hf download gpt2 --local-dir hf/gpt2`.
            Supported: model_type gpt2 and llama (GPT-2, DistilGPT2, TinyLlama, SmolLM, Llama 2/3 without
            RoPE scaling); anything lm cannot compute exactly is refused with its name.
        output: The checkpoint file to write (atomically; an existing one only with --overwrite true).
        overwrite: Replace `output` (and `recipe`) if they exist.
        dtype: The weights' precision in the checkpoint. float32 is what `lm fit` trains in (and what the
            import is checked in); bfloat16 halves the file, and every verb loads it into the model's dtype.
        recipe: Also write a YAML overlay for `lm fit --config RECIPE`: this model's architecture, vocabulary
            and `model.init_from` the checkpoint (a run whose architecture differs is refused).
    """
    if not hf_folder or not output:
        raise LMError("Pass both --hf_folder (a Hugging Face model folder) and --output (the .ckpt file to write).")
    targets = [Path(output)] + ([Path(recipe)] if recipe else [])
    for target in targets:  # before the conversion, which can take minutes on a large model
        if target.is_dir():
            raise LMError(f"{target} is a folder: pass a file name (e.g. {target / 'model.ckpt'}).")
        if target.exists() and not overwrite:
            raise LMError(f"{target} already exists: choose another path, or pass --overwrite true to replace it.")
    model, tokenizer, notes = load_hf_folder(hf_folder, DTYPES[dtype])
    path = save_model(output, model, tokenizer, overwrite=overwrite)
    for note in notes:
        print(note)
    config = model.config
    print(f"Imported {hf_folder} to {path}: {model.num_parameters() / 1e6:.1f}M parameters, {config.num_hidden_layers} "
          f"layers x {config.hidden_size}, vocabulary {config.vocab_size}, context {config.max_position_embeddings}, {dtype}.")
    if recipe:
        atomic_write_text(recipe, recipe_yaml(model, path, hf_folder, recipe))
        print(f"Wrote {recipe}: lm fit --config {recipe} --data.train_files '[my.txt]' --experiment NAME")
    print(f"Try it: lm generate --ckpt_path {path} --prompt \"The\"")


def recipe_yaml(model: GPT, checkpoint: Path, source: str, recipe: str) -> str:
    """A YAML overlay that continues training `checkpoint`: its architecture (which `init_from` requires) and
    vocabulary. Training choices (learning rate, schedule, batch, dropout) stay the run's."""
    config = model.config.to_dict()
    vocab_size = config.pop("vocab_size")  # a link: data.vocab_size sets the model's
    header = (f"# Continue training {checkpoint} (lm import of {source}); the architecture must stay as it is.\n"
              f"#   lm fit --config {recipe} --data.train_files '[my.txt]' --experiment NAME --model.learning_rate 3e-5\n"
              f"# (a pretrained model wants a far smaller learning rate than lm's from-scratch default)\n")
    body = {"model": {"init_from": str(Path(checkpoint).resolve()), "config": config}, "data": {"vocab_size": vocab_size}}
    return header + yaml.safe_dump(body, sort_keys=False)
