"""`lm export`: a checkpoint written by `lm fit` as a folder other tools read.

    lm export --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --format safetensors --output exports/wt2
    lm export --ckpt_path ... --format hf --output exports/wt2-hf       # AutoModelForCausalLM.from_pretrained
    lm export --ckpt_path ... --format onnx --output exports/wt2-onnx   # onnxruntime.InferenceSession
    lm export --ckpt_path ... --format gguf --output exports/wt2-gguf --gguf_type q8_0   # llama.cpp, Ollama
"""

from __future__ import annotations

from typing import Literal, Optional

from lm.errors import LMError
from lm.export.gguf import GGUFType, export_gguf


def export(ckpt_path: Optional[str] = None, output: Optional[str] = None,
           format: Literal["safetensors", "hf", "onnx", "gguf"] = "safetensors", overwrite: bool = False,
           context_cache: Optional[bool] = None, gguf_type: Optional[GGUFType] = None) -> None:
    """Export a float checkpoint (not an `lm quantize` one) to a folder.

    Args:
        ckpt_path: A checkpoint written by `lm fit` or `lm prune`.
        output: The folder to write (created; it must not exist unless --overwrite true).
        format: `safetensors`: model.safetensors + config.json (GPTConfig) + tokenizer.json, read back by
            `lm.export.safetensors.load_folder`. `hf`: a hub-ready Hugging Face transformers folder with a
            model card (GPT2LMHeadModel for the gpt2 preset, LlamaForCausalLM for the llama preset; every other
            variant, the default recipe's included, as lm's own code: `trust_remote_code=True`).
            `onnx`: model.onnx (input_ids -> logits, no KV cache) + config.json + tokenizer.json.
            `gguf`: model.gguf (weights + tokenizer) for llama.cpp / Ollama / LM Studio (arch llama for the
            llama preset, gpt2 for the GPT-2 preset; other variants are refused with the reason).
        overwrite: Replace `output` if it exists.
        context_cache: For a model trained with `context_cache: true` (the default recipe): keep the cache's
            mixture (safetensors and onnx carry it), or false to export the network's plain softmax (what
            `lm generate` samples by default). Default: kept where the format can carry it; `hf` always
            exports the plain softmax (transformers has no context cache) and says so; so does `gguf`.
        gguf_type: For --format gguf, the weight type: `f32`, `f16` (default; llama.cpp's convert default)
            or `q8_0` (8-bit blocks, ~1/4 of f32). Norms, biases and positions stay f32.
    """
    from lm.io.checkpoints import load_model, read_checkpoint
    from lm.model import GPT

    if not ckpt_path or not output:
        raise LMError("Pass both --ckpt_path (a checkpoint written by `lm fit`) and --output (the folder to write).")
    if gguf_type is not None and format != "gguf":
        raise LMError(f"--gguf_type is for --format gguf, not {format}: drop it, or pass --format gguf.")
    checkpoint = read_checkpoint(ckpt_path)  # memory-mapped: load_model reads the same pages again
    if checkpoint.get("hyper_parameters", {}).get("quantization"):
        raise LMError(f"{ckpt_path} is an int8 checkpoint from `lm quantize`: export the float checkpoint it was made from.")
    model, tokenizer = load_model(ckpt_path)
    if not isinstance(model, GPT):
        raise LMError(f"{ckpt_path} holds a {type(model).__name__}, not a GPT: only the GPT's layout can be exported.")
    if getattr(model, "accepts_context_cache", False):
        if context_cache is None:
            context_cache = format not in ("hf", "gguf")
        if context_cache and format in ("hf", "gguf"):
            runtime = {"hf": "Hugging Face: transformers", "gguf": "GGUF: llama.cpp"}[format]
            raise LMError(f"--context_cache true cannot be exported to {runtime} has no context "
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
        from lm.export.hf import checkpoint_facts, export_hf

        def write(model, tokenizer, output, overwrite):  # the model card states the run the checkpoint records
            return export_hf(model, tokenizer, output, overwrite, facts=checkpoint_facts(checkpoint, ckpt_path))
    elif format == "gguf":
        def write(model, tokenizer, output, overwrite):
            return export_gguf(model, tokenizer, output, overwrite, gguf_type=gguf_type or "f16")
    else:
        from lm.export.onnx import export_onnx as write
    folder = write(model, tokenizer, output, overwrite)
    print(f"Wrote {format} export of {ckpt_path} to {folder}/: {', '.join(sorted(p.name for p in folder.iterdir()))}")
