"""Start a network from another run's weights: `--model.init_from <ckpt>` (continued pre-training) and
the backbone of fine-tuning modules.

What this file does:
- `checkpoint_parts(path)`: the config, tokenizer and GPT weights inside an `lm` checkpoint;
- `check_fits(...)`: refuse a checkpoint whose architecture or tokenizer differs from the run's, with
  a message that names every difference (a shape mismatch deep inside `load_state_dict` says less);
- `load_initial_weights(module, path)`: weights only into `module.model`. The optimizer, schedule,
  step counter and random states are the new run's own: that is what makes it a new run, unlike
  `--ckpt_path`, which resumes the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.io.checkpoints import read_checkpoint
from lm.model import GPTConfig
from lm.modules.temperature_calibration import unfold_temperature

# Fields that change parameter shapes or what the weights mean; dropout / init / attention kernel don't.
_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "max_position_embeddings", "position", "norm", "activation", "bias",
                        "tie_embeddings", "qk_norm", "residual_scalars", "value_embeddings",
                        "bigram_embedding", "smear")


@dataclass
class CheckpointParts:
    config: GPTConfig
    tokenizer_json: Optional[str]
    state_dict: dict[str, Tensor]  # the GPT's own keys (no "model." prefix)


def checkpoint_parts(path: str | Path, prefix: str = "model.") -> CheckpointParts:
    """Config, tokenizer JSON and network weights of a checkpoint written by `lm fit`: the weights as trained (a
    temperature folded in by `calibrate_temperature` is taken out: a new run trains on from the trained network)."""
    checkpoint = read_checkpoint(path)
    unfold_temperature(checkpoint)
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams:
        raise LMError(f"{path} is not an `lm` language-model checkpoint (no model config in it): "
                         f"pass a .ckpt written by `lm fit`.")
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()
             if k.startswith(prefix)}
    return CheckpointParts(GPTConfig.from_dict(hparams["config"]).resolved(), checkpoint.get("tokenizer"), state)


def config_differences(run: GPTConfig, checkpoint: GPTConfig) -> list[str]:
    """`field: run X, checkpoint Y` for every architecture field that differs."""
    run, checkpoint = run.resolved(), checkpoint.resolved()
    return [f"{name}: this run {getattr(run, name)!r}, checkpoint {getattr(checkpoint, name)!r}"
            for name in _ARCHITECTURE_FIELDS if getattr(run, name) != getattr(checkpoint, name)]


def tokenizer_difference(run_json: Optional[str], checkpoint_json: Optional[str]) -> Optional[str]:
    """Why two tokenizers differ (None if they are the same or either is unknown)."""
    if run_json is None or checkpoint_json is None or run_json == checkpoint_json:
        return None
    a, b = Tokenizer.from_str(run_json), Tokenizer.from_str(checkpoint_json)
    if a.vocab_size != b.vocab_size:
        return f"tokenizer: this run's has {a.vocab_size} tokens, the checkpoint's {b.vocab_size}"
    return f"tokenizer: both have {a.vocab_size} tokens but different merges/ids (trained on other text)"


def check_fits(path: str | Path, model: nn.Module, run_config: GPTConfig, parts: CheckpointParts,
               run_tokenizer_json: Optional[str]) -> None:
    """Raise ValueError naming every difference between the run and the checkpoint."""
    problems = config_differences(run_config, parts.config)
    reason = tokenizer_difference(run_tokenizer_json, parts.tokenizer_json)
    if reason:
        problems.append(reason)
    if not problems:  # same config: a custom network (build_model) may still differ
        own = model.state_dict()
        problems = [f"{k}: this run {tuple(own[k].shape)}, checkpoint {tuple(v.shape)}"
                    for k, v in parts.state_dict.items() if k in own and own[k].shape != v.shape]
        # The context cache's calibration is not a weight: a run may add it to a checkpoint without one.
        missing = sorted(k for k in set(own) - set(parts.state_dict) if not k.startswith("context_cache."))
        if missing:
            problems.append(f"weights the checkpoint lacks: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if problems:
        raise LMError(f"Cannot initialize from {path}: it does not fit this run. " + "; ".join(problems) +
                         ". Use the checkpoint's architecture (drop the differing --model.config flags) and its "
                         "tokenizer (the run takes it from the checkpoint unless --data.tokenizer_path is set).")


def load_initial_weights(module: Any, path: str | Path) -> None:
    """Copy a checkpoint's network weights into `module.model` (a LanguageModel or subclass), after
    checking architecture and tokenizer. Call it from `setup` (before `configure_model` shards or
    compiles): when the Trainer resumes a run with `--ckpt_path`, Lightning restores that checkpoint
    after `setup`, so the resumed weights win."""
    parts = checkpoint_parts(path)
    tokenizer = getattr(module, "tokenizer", None)
    check_fits(path, module.model, module.config, parts, tokenizer.to_str() if tokenizer is not None else None)
    module.model.load_state_dict(parts.state_dict, strict=False)
    if tokenizer is None and parts.tokenizer_json is not None and hasattr(module, "set_tokenizer"):
        module.set_tokenizer(Tokenizer.from_str(parts.tokenizer_json))
