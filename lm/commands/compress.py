"""`lm quantize` and `lm prune`: a checkpoint in, a smaller checkpoint out (read by `lm generate`
and `lm.io.checkpoints.load_model` like any other).

    lm quantize --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --output checkpoints/wikitext2_cpu/int8.ckpt
    lm prune --ckpt_path .../last.ckpt --output .../pruned50.ckpt --method unstructured --sparsity 0.5
    lm prune --ckpt_path .../last.ckpt --output .../mlp30.ckpt --method mlp_channels --sparsity 0.3
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

from lm.compress.prune import prune_heads, prune_mlp_channels, prune_unstructured, sparsity_of
from lm.compress.quantize import METHOD, QUANTIZATION_KEY, linear_weight_bytes, quantize_model
from lm.errors import LMError
from lm.io.checkpoints import load_model, read_checkpoint, save_model
from lm.model import GPT


def _load(ckpt_path: Optional[str], output: Optional[str]):
    if not ckpt_path or not output:
        raise LMError("Pass both --ckpt_path (a checkpoint written by `lm fit`) and --output (the new file to write).")
    if Path(output).resolve() == Path(ckpt_path).resolve():
        raise LMError(f"--output {output} is the input checkpoint: write the result to a new file.")
    checkpoint = read_checkpoint(ckpt_path)
    hparams = copy.deepcopy(dict(checkpoint.get("hyper_parameters", {})))
    if hparams.get("quantization"):
        raise LMError(f"{ckpt_path} is already quantized ({hparams['quantization']}): start from the float checkpoint.")
    model, tokenizer = load_model(ckpt_path)
    return model, tokenizer, hparams


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB"


def quantize(ckpt_path: Optional[str] = None, output: Optional[str] = None, overwrite: bool = False) -> None:
    """Quantize a checkpoint's linear layers to int8 (per-row weight scales, dynamic int8 activations).

    The tied embedding / LM head matrix is quantized once and serves both; norms, positions and biases
    stay fp32. The output is read by `lm generate --ckpt_path` and `lm.io.checkpoints.load_model`.

    Args:
        ckpt_path: A float checkpoint written by `lm fit` (or `lm prune`).
        output: Where to write the int8 checkpoint (a new file).
        overwrite: Replace `output` if it exists.
    """
    model, tokenizer, hparams = _load(ckpt_path, output)
    before = linear_weight_bytes(model)
    quantize_model(model)
    hparams[QUANTIZATION_KEY] = {"method": METHOD, "source": str(ckpt_path)}
    path = save_model(output, model, tokenizer, hparams, overwrite=overwrite)
    after = linear_weight_bytes(model)
    print(f"Linear weights {_mb(before)} -> {_mb(after)} ({before / after:.2f}x smaller); "
          f"file {_mb(Path(ckpt_path).stat().st_size)} -> {_mb(path.stat().st_size)}: {path}")


def prune(ckpt_path: Optional[str] = None, output: Optional[str] = None, method: Literal["unstructured", "mlp_channels", "heads"] = "unstructured",
          sparsity: float = 0.3, overwrite: bool = False) -> None:
    """Magnitude-prune a checkpoint and write the result (permanently pruned) to a new checkpoint.

    Args:
        ckpt_path: A float checkpoint written by `lm fit`.
        output: Where to write the pruned checkpoint (a new file).
        method: `unstructured`: zero the smallest weights of the transformer blocks' linear layers,
            globally (tensors keep their shape). `mlp_channels`: remove the weakest MLP hidden
            channels, the same number in every layer, so `intermediate_size` and the tensors shrink.
            `heads` is not supported (explained when chosen).
        sparsity: Fraction removed: of the block weights (unstructured) or of each layer's MLP channels.
        overwrite: Replace `output` if it exists.
    """
    model, tokenizer, hparams = _load(ckpt_path, output)
    if not isinstance(model, GPT):
        raise LMError(f"{ckpt_path} holds a {type(model).__name__}, not a GPT: pruning knows the GPT's layers only.")
    before = model.num_parameters()
    model = {"unstructured": prune_unstructured, "mlp_channels": prune_mlp_channels, "heads": prune_heads}[method](
        model, sparsity)
    hparams["config"] = {**hparams["config"], "intermediate_size": model.config.intermediate_size}
    hparams["pruning"] = {"method": method, "sparsity": sparsity, "source": str(ckpt_path)}
    path = save_model(output, model, tokenizer, hparams, overwrite=overwrite)
    print(f"{method} pruning: {before / 1e6:.3f}M -> {model.num_parameters() / 1e6:.3f}M parameters, "
          f"block weights {sparsity_of(model):.1%} zeros, intermediate_size {model.config.intermediate_size}: {path}")
