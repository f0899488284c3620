"""`lm export`: a checkpoint written by `lm fit` as a folder other tools read.

    lm export --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --format safetensors --output exports/wt2
    lm export --ckpt_path ... --format hf --output exports/wt2-hf       # AutoModelForCausalLM.from_pretrained
    lm export --ckpt_path ... --format onnx --output exports/wt2-onnx   # onnxruntime.InferenceSession
"""

from __future__ import annotations

from typing import Literal, Optional

from lm.errors import LMError


def export(ckpt_path: Optional[str] = None, output: Optional[str] = None,
           format: Literal["safetensors", "hf", "onnx"] = "safetensors", overwrite: bool = False) -> None:
    """Export a float checkpoint (not an `lm quantize` one) to a folder.

    Args:
        ckpt_path: A checkpoint written by `lm fit` or `lm prune`.
        output: The folder to write (created; it must not exist unless --overwrite true).
        format: `safetensors`: model.safetensors + config.json (GPTConfig) + tokenizer.json, read back by
            `lm.export.safetensors.load_folder`. `hf`: a Hugging Face transformers folder (GPT-2 for the
            default GPT, Llama for the llama preset; other variants are refused with the reason).
            `onnx`: model.onnx (input_ids -> logits, no KV cache) + config.json + tokenizer.json.
        overwrite: Replace `output` if it exists.
    """
    from lm.checkpoint import load_model, read_checkpoint
    from lm.model import GPT

    if not ckpt_path or not output:
        raise LMError("Pass both --ckpt_path (a checkpoint written by `lm fit`) and --output (the folder to write).")
    if read_checkpoint(ckpt_path).get("hyper_parameters", {}).get("quantization"):
        raise LMError(f"{ckpt_path} is an int8 checkpoint from `lm quantize`: export the float checkpoint it was made from.")
    model, tokenizer = load_model(ckpt_path)
    if not isinstance(model, GPT):
        raise LMError(f"{ckpt_path} holds a {type(model).__name__}, not a GPT: only the GPT's layout can be exported.")
    if format == "safetensors":
        from lm.export.safetensors import export_safetensors as write
    elif format == "hf":
        from lm.export.hf import export_hf as write
    else:
        from lm.export.onnx import export_onnx as write
    folder = write(model, tokenizer, output, overwrite)
    print(f"Wrote {format} export of {ckpt_path} to {folder}/: {', '.join(sorted(p.name for p in folder.iterdir()))}")
