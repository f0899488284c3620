"""LoRA adapters on the hand-written GPT, through Hugging Face `peft` (the `finetune` extra: `lm[finetune]`).

peft injects its LoRA layers into any `nn.Module` by the names of its `nn.Linear` layers (no
`transformers` model needed): `qkv_proj`, `o_proj`, `up_proj`, `gate_up_proj`, `down_proj` here.
Each targeted layer becomes a peft `lora.Linear` that keeps the original as `base_layer` and adds
`lora_A` / `lora_B` (B starts at zero, so the adapted model starts equal to the backbone); every
weight that is not an adapter is frozen.

- `add_lora(model, ...)`: inject adapters in place;
- `merge_lora(model)`: fold `W + alpha / r * B A` into each base weight and put the plain
  `nn.Linear` back, so the result is an ordinary GPT with ordinary state-dict keys (export).
"""

from __future__ import annotations

from torch import nn

from lm.errors import LMError
from lm.extras import require

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "up_proj", "gate_up_proj", "down_proj")


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    """Inject LoRA adapters into the `nn.Linear` layers named in `targets`; freeze everything else."""
    require("finetune", "LoRA fine-tuning (lora_rank > 0)")
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = [t for t in targets if t in present]
    if not wanted:
        raise LMError(f"No layer of the model is named like the LoRA targets {list(targets)}; "
                         f"its linear layers are {sorted(present)}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=wanted, bias="none")
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it: the model's keys are plain GPT keys again."""
    require("finetune", "Merging LoRA adapters")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model.requires_grad_(True)
    return model
