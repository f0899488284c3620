"""The network's softmax temperature, calibrated on the validation text and folded into the checkpoints.

Many epochs over a small corpus leave the network over-confident on text it has not seen: the default recipe's
`make train` checkpoint (10 epochs of WikiText-2 valid) scores the test text at 2.0808 bpb with its own softmax and
at 2.0550 with the logits divided by 1.15, the temperature its held-out validation text picks
(docs/results/quality.md). `LanguageModel(calibrate_temperature=True)` makes that part of training:

- each validation sums the network's NLL at every temperature of `TEMPERATURES` (one float32 read of each chunk
  of logits for all of them: `target_log_probs_by_temperature`), keeps the best and logs `val/temperature`,
  `val/calibrated_loss` and `val/calibrated_bpb` (`val/*` stays the trained network's);
- training never sees it: the live weights stay as trained;
- each saved checkpoint carries it folded into the weights (`fold_temperature`): the final norm's weight and bias
  divided by T make every logit 1/T of the trained network's, exactly (the LM head is linear without a bias and
  reads the norm's output). So every verb after training (test, eval, generate, export, quantize, serve,
  fine-tune) sees the calibrated network with no code of its own. The context cache's mixture stays the same:
  its temperature is divided by T too, and its copy attention compares normalized hidden states;
- a resumed fit puts the trained tensors back (`unfold_temperature`, from copies the checkpoint keeps), so
  training goes on from exactly the weights it had.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lm.errors import LMError
from lm.evaluation.token_losses import target_log_probs_by_temperature
from lm.io.checkpoints import NETWORK_TEMPERATURE_KEY

TEMPERATURES = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5)  # 1.0: the network as trained (val/loss)
FOLDED = ("norm.weight", "norm.bias", "context_cache.temperature")  # the tensors a fold divides by T
CHECKPOINT_KEY = NETWORK_TEMPERATURE_KEY  # {"temperature": T, "trained": {state-dict key: the tensor before the fold}}


def check_foldable(network: nn.Module) -> None:
    """A temperature folds into the weights exactly when the logits are a bias-free linear map of the final
    norm's output and nothing nonlinear follows: lm.model.GPT without `logit_softcap`."""
    norm, head = getattr(network, "norm", None), getattr(network, "lm_head", None)
    config = getattr(network, "config", None)
    problems = [what for what, bad in (
        ("a final `norm` with a weight", getattr(norm, "weight", None) is None),
        ("an `lm_head` without a bias", not isinstance(head, nn.Linear) or head.bias is not None),
        ("no logit_softcap", getattr(config, "logit_softcap", None) is not None),
    ) if bad]
    if problems:
        raise LMError(f"model.calibrate_temperature folds the temperature into the final norm, which needs {' and '.join(problems)} "
                      f"(as lm.model.GPT has by default); the network is a {type(network).__name__}. Drop the option.")


def check_full_state_dict(strategy: Any) -> None:
    """Refuse, before training, a strategy whose checkpoints hold a sharded state dict: the fold divides full
    tensors (Lightning's FSDPStrategy with `state_dict_type="sharded"`, ModelParallelStrategy (FSDP2) with
    `save_distributed_checkpoint=True`). Checked again at every save (`fold_temperature`)."""
    sharded = (getattr(strategy, "_state_dict_type", None) == "sharded"
               or getattr(strategy, "_save_distributed_checkpoint", False))
    if sharded:
        raise LMError(f"model.calibrate_temperature folds the temperature into a full state dict, and this "
                      f"{type(strategy).__name__} saves sharded checkpoints. Save full ones (FSDPStrategy: "
                      f"state_dict_type: full; ModelParallelStrategy: save_distributed_checkpoint: false, as "
                      f"experiments/trainer/fsdp2_cpu.yaml does), or drop the option (--model.calibrate_temperature "
                      f"false).")


def fold_temperature(checkpoint: dict[str, Any], temperature: Optional[float], prefix: str = "model.") -> None:
    """Divide the network's logits by `temperature` in `checkpoint["state_dict"]` (new tensors for `FOLDED`,
    the live model's are untouched) and keep the trained tensors under `CHECKPOINT_KEY` for a resume."""
    if temperature is None:
        return
    state = checkpoint["state_dict"]
    keys = [prefix + name for name in FOLDED if prefix + name in state]
    if not all(type(state[key]) is Tensor for key in keys):  # a sharded (FSDP / DTensor) state dict
        raise LMError("model.calibrate_temperature folds the temperature into a full state dict, and this "
                      "strategy saves a sharded one: drop the option for sharded runs.")
    trained = {key: state[key] for key in keys}
    for key in keys:
        state[key] = trained[key] / temperature
    checkpoint[CHECKPOINT_KEY] = {"temperature": float(temperature),
                                  "trained": {key: value.detach().clone() for key, value in trained.items()}}


def unfold_temperature(checkpoint: dict[str, Any]) -> Optional[float]:
    """Put a folded checkpoint's trained tensors back into its state dict (a resumed fit trains from them);
    return the temperature it was folded with (None: not folded)."""
    saved = checkpoint.pop(CHECKPOINT_KEY, None)
    if saved is None:
        return None
    checkpoint["state_dict"].update(saved["trained"])
    return saved["temperature"]


def summed_nll_by_temperature(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """(len(TEMPERATURES),) float64: the summed NLL of `targets` (B, T) at each temperature."""
    scored = targets != ignore_index
    log_probs = target_log_probs_by_temperature(logits, targets.clamp(min=0), TEMPERATURES)
    return -(log_probs * scored).sum(dim=(1, 2), dtype=torch.float64)
