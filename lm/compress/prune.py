"""Magnitude pruning of a GPT (`lm prune`), made permanent.

- `prune_unstructured(model, sparsity)`: global magnitude pruning (torch.nn.utils.prune's
  `global_unstructured` with L1) over the weights of every linear layer inside the transformer
  blocks: the `sparsity` fraction of smallest |w| across all of them becomes 0, then the masks are
  folded into the weights (`prune.remove`), so the zeros are plain values that survive save/load.
  The tied embedding / LM head is left dense (every row is a token's embedding). Dense kernels do
  not skip zeros: this saves nothing at run time by itself (it would with a sparse format or after
  compression of the file), which the benchmark shows.
- `prune_mlp_channels(model, sparsity)`: structured: the same number of MLP hidden channels is
  removed in every layer (the lowest |up row| * |down column|, gate and up rows together for SwiGLU),
  so the result is again a `GPT` whose config has a smaller `intermediate_size`: the tensors really
  shrink and decoding gets faster.

Attention heads cannot be removed this way: `GPTConfig` ties the attention width to `hidden_size`
(head_dim = hidden_size / num_attention_heads, and o_proj is hidden x hidden), so a GPT with fewer
heads of the same size is not expressible; `prune_heads` explains that instead of writing a model
that would not load.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lm.errors import LMError
from lm.model import GPT, build_gpt


def block_linears(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The linear layers inside the transformer blocks (not the embedding / LM head)."""
    return [(name, m) for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)]


def prune_unstructured(model: GPT, sparsity: float) -> GPT:
    """Zero the `sparsity` fraction of smallest-magnitude block weights, globally; permanent. In place."""
    _check_sparsity(sparsity)
    params = [(m, "weight") for _, m in block_linears(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in params:
        prune.remove(module, name)  # weight = weight_orig * mask, as a plain parameter again
    return model


def sparsity_of(model: GPT) -> float:
    """Fraction of exact zeros among the block linear weights."""
    weights = [m.weight for _, m in block_linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _channel_scores(mlp: nn.Module) -> Tensor:
    """Importance of each MLP hidden channel: norm of what writes it times norm of what reads it."""
    down = mlp.down_proj.weight.detach().norm(dim=0)
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.detach().split(mlp.intermediate_size, dim=0)
        return (gate.norm(dim=1) + up.norm(dim=1)) * down
    return mlp.up_proj.weight.detach().norm(dim=1) * down


def _slice_mlp(state: dict[str, Tensor], prefix: str, keep: Tensor, size: int, swiglu: bool) -> None:
    """Keep hidden channels `keep` in the state-dict entries of the MLP at `prefix` (in place)."""
    if swiglu:
        rows = torch.cat([keep, keep + size])  # gate rows then up rows
        names = [f"{prefix}gate_up_proj.weight", f"{prefix}gate_up_proj.bias"]
    else:
        rows = keep
        names = [f"{prefix}up_proj.weight", f"{prefix}up_proj.bias"]
    for name in names:
        if name in state:
            state[name] = state[name][rows].contiguous()
    state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][:, keep].contiguous()


def prune_mlp_channels(model: GPT, sparsity: float) -> GPT:
    """A new, smaller GPT without the `sparsity` fraction of each layer's weakest MLP channels."""
    _check_sparsity(sparsity)
    config = model.config
    size = config.intermediate_size
    kept = max(1, round(size * (1 - sparsity)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.layers):
        keep = _channel_scores(block.mlp).topk(kept).indices.sort().values
        _slice_mlp(state, f"layers.{i}.mlp.", keep, size, config.activation == "swiglu")
    smaller = build_gpt(replace(config, intermediate_size=kept))
    smaller.load_state_dict(state)
    return smaller.to(model.embed_tokens.weight.dtype).eval()


def prune_heads(model: GPT, sparsity: float) -> GPT:
    raise LMError(
        "Structured pruning of attention heads is not supported: GPTConfig fixes head_dim = hidden_size / "
        "num_attention_heads and an attention output of hidden_size, so a model with fewer heads is not a GPTConfig. "
        "Use --method mlp_channels (structured, shrinks intermediate_size) or --method unstructured."
    )


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise LMError(f"sparsity must be a fraction in (0, 1), e.g. 0.3 for 30%, got {sparsity}.")
