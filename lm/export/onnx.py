"""`lm export --format onnx`: the model as an ONNX graph for onnxruntime and other edge runtimes.

The graph is the no-cache forward: `input_ids` (batch, sequence) int64 -> `logits` (batch, sequence,
vocab) float32, both dimensions dynamic (sequence up to `max_position_embeddings`). A generation loop
re-runs it on the whole sequence each step (no KV cache in the graph). Exported with torch's
`torch.export`-based exporter (`torch.onnx.export(dynamo=True)`), which needs the `onnx` and
`onnxscript` packages (the `export` extra: `pip install 'lm[export]'`); the core install does not have them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from lm.export.folder import write_json, write_folder
from lm.extras import require
from lm.model import GPT
from lm.model.layers import CausalSelfAttention


class _Logits(nn.Module):
    """`GPT.forward` with only the argument the graph has: for a `GPTWithContextCache`, its mixture."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.options = {"context_cache": True} if getattr(model, "accepts_context_cache", False) else {}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids, **self.options)


def export_onnx(model: GPT, tokenizer, output: str | Path, overwrite: bool = False) -> Path:
    """Write model.onnx (weights inside the file), config.json and tokenizer.json to the `output` folder."""
    # torch's exporter needs onnx and onnxscript: fail here with the fix, not deep inside it.
    require("export", "lm export --format onnx")
    model = copy.deepcopy(model).float().eval()
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            # SDPA's `is_causal=T > 1` is not a constant once the sequence length is symbolic; the
            # written-out attention (same output to float rounding) builds its causal mask instead.
            module.impl = "math"
    context = model.config.max_position_embeddings
    example = torch.zeros(2, min(8, context), dtype=torch.long)
    dims = {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("sequence", max=context)}

    def fill(folder: Path) -> None:
        program = torch.onnx.export(_Logits(model).eval(), (example,), input_names=["input_ids"],
                                    output_names=["logits"],
                                    dynamic_shapes={"input_ids": dims}, dynamo=True, external_data=False,
                                    verbose=False)
        program.save(str(folder / "model.onnx"), external_data=False)
        write_json(folder / "config.json", model.config.to_dict())
        (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")

    return write_folder(output, fill, overwrite)
