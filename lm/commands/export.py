"""`lm export`: a checkpoint written by `lm fit` as a folder other tools read.

    lm export --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --format safetensors --output exports/wt2
    lm export --ckpt_path ... --format hf --output exports/wt2-hf       # AutoModelForCausalLM.from_pretrained
    lm export --ckpt_path ... --format onnx --output exports/wt2-onnx   # onnxruntime.InferenceSession
"""

from __future__ import annotations

from typing import Literal, Optional

from lm.errors import LMError


def export(ckpt_path: Optional[str] = None, output: Optional[str] = None,
           format: Literal["safetensors", "hf", "onnx"] = "safetensors", overwrite: bool = False,
           context_cache: Optional[bool] = None) -> None:
    """Export a float checkpoint (not an `lm quantize` one) to a folder.

    Args:
        ckpt_path: A checkpoint written by `lm fit` or `lm prune`.
        output: The folder to write (created; it must not exist unless --overwrite true).
        format: `safetensors`: model.safetensors + config.json (GPTConfig) + tokenizer.json, read back by
            `lm.export.safetensors.load_folder`. `hf`: a Hugging Face transformers folder (GPT-2 for the
            default GPT, Llama for the llama preset; other variants are refused with the reason).
            `onnx`: model.onnx (input_ids -> logits, no KV cache) + config.json + tokenizer.json.
        overwrite: Replace `output` if it exists.
        context_cache: For a model trained with `context_cache: true` (the default recipe): keep the cache's
            mixture (safetensors and onnx carry it), or false to export the network's plain softmax (what
            `lm generate` samples by default). Default: kept where the format can carry it; `hf` always
            exports the plain softmax (transformers has no context cache) and says so.
    """
    from lm.io.checkpoints import load_model, read_checkpoint
    from lm.model import GPT

    if not ckpt_path or not output:
        raise LMError("Pass both --ckpt_path (a checkpoint written by `lm fit`) and --output (the folder to write).")
    if read_checkpoint(ckpt_path).get("hyper_parameters", {}).get("quantization"):
        raise LMError(f"{ckpt_path} is an int8 checkpoint from `lm quantize`: export the float checkpoint it was made from.")
    model, tokenizer = load_model(ckpt_path)
    if not isinstance(model, GPT):
        raise LMError(f"{ckpt_path} holds a {type(model).__name__}, not a GPT: only the GPT's layout can be exported.")
    if getattr(model, "accepts_context_cache", False):
        if context_cache is None:
            context_cache = format != "hf"
        if context_cache and format == "hf":
            raise LMError("--context_cache true cannot be exported to Hugging Face: transformers has no context "
                          "cache. Use --format safetensors or onnx to keep it, or drop the flag for the plain softmax.")
        if not context_cache:
            model = model.without_context_cache()
            print("The context cache (a scoring-only extension, GPTConfig.context_cache) is not exported: the "
                  "export computes the network's plain softmax, as `lm generate` samples by default.")
    elif context_cache:
        raise LMError(f"--context_cache true: {ckpt_path} has no context cache (its config has context_cache: false).")
    if format == "safetensors":
        from lm.export.safetensors import export_safetensors as write
    elif format == "hf":
        from lm.export.hf import export_hf as write
    else:
        from lm.export.onnx import export_onnx as write
    folder = write(model, tokenizer, output, overwrite)
    print(f"Wrote {format} export of {ckpt_path} to {folder}/: {', '.join(sorted(p.name for p in folder.iterdir()))}")
