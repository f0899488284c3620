"""`lm merge`: turn a fine-tuned checkpoint into a plain `lm` checkpoint (LoRA adapters folded in).

    lm merge --ckpt_path checkpoints/alpaca_lora/last.ckpt --output exports/alpaca.ckpt
    lm generate --ckpt_path exports/alpaca.ckpt --template alpaca --prompt "Name three colors."

The output holds the GPT's config, merged weights and tokenizer, nothing of the training state: it
is what `load_model`, `lm generate`, `lm eval` and `--model.init_from` read. A full fine-tuning
checkpoint exports the same way (there is nothing to merge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lm.errors import LMError
from lm.io.checkpoints import read_checkpoint, save_model
from lm.modules.instruct import InstructionTuner


def merge(ckpt_path: Optional[str] = None, output: Optional[str] = None) -> None:
    """Write the checkpoint's network, with any LoRA adapters merged into its weights, as a plain lm checkpoint.

    Args:
        ckpt_path: An `InstructionTuner` checkpoint written by `lm finetune fit`.
        output: Where to write the merged checkpoint (must not be ckpt_path).
    """
    if not ckpt_path or not output:
        raise LMError("Pass --ckpt_path (an `lm finetune fit` checkpoint) and --output (the file to write).")
    if Path(output).resolve() == Path(ckpt_path).resolve():
        raise LMError("--output must differ from --ckpt_path: the training checkpoint is kept as it is.")
    hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
    if "lora_rank" not in hparams:
        raise LMError(f"{ckpt_path} is not an instruction-tuning checkpoint (written by `lm finetune fit` with "
                         f"InstructionTuner); a pre-training checkpoint is already plain: use it as it is (lm generate, lm eval).")
    tuner = InstructionTuner.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    save_model(output, tuner.merged_model().eval(), tuner.tokenizer)
    print(f"Wrote {output} (LoRA rank {hparams['lora_rank'] or 'none: full fine-tuning'}, merged).")
