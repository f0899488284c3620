"""`ContextCacheCalibration`: fits a context cache's three scalars on the validation text, and scores the
mixture beside the network.

A model with `config.context_cache` (lm/model/context_cache.py) gets this callback from
`LanguageModel.configure_callbacks`; no recipe lists it. It reads each validation batch once more with the
cache's inputs (the final hidden states), sums the NLL at every grid point of (sharpness, weight,
temperature) and, when validation ends, keeps the best point in the model's buffers (so the checkpoint
saved after it carries them). Choosing 3 scalars on the validation text is like choosing the checkpoint
on it: the test text stays unseen. Logged, beside the network's own `val/*` and `test/*`:

- `val/cache_loss`, `val/cache_ppl`, `val/cache_bpb`: the calibrated mixture on the validation text;
- `val/cache_sharpness`, `val/cache_weight`, `val/cache_temperature`: the point kept;
- `test/cache_loss`, `test/cache_ppl`, `test/cache_bpb`: the mixture on the test text (`lm test`).

The hidden states are the step's own: a forward hook on the final norm keeps them while validation or test
runs, so only the LM head is computed again (if the hook saw nothing, e.g. under a compiled model, the batch
is run again under the step's precision).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from lm.evaluation.token_losses import IGNORE_INDEX, token_nll

from lm.evaluation.token_metrics import LanguageModelingMetrics
from lm.model.context_cache import GPTWithContextCache, cache_inputs


class ContextCacheCalibration(L.Callback):
    """Calibrates `pl_module.model`'s context cache every validation; scores the mixture in test."""

    def __init__(self) -> None:
        self.metrics: Optional[LanguageModelingMetrics] = None  # this validation's grid, or this test's mixture
        self._hidden: Optional[Tensor] = None  # the final norm's output of the current batch
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None

    @staticmethod
    def _model(pl_module: L.LightningModule) -> Optional[GPTWithContextCache]:
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, GPTWithContextCache) else None

    def _begin(self, pl_module: L.LightningModule, grid: bool) -> None:
        """Metrics for this validation (the calibration grid) or test (the mixture), and the hook listening."""
        self._stop()
        model = self._model(pl_module)
        if model is not None:
            self._hook = model.norm.register_forward_hook(
                lambda module, args, output: setattr(self, "_hidden", output.detach()))
            self.metrics = LanguageModelingMetrics(model.context_cache.grid_shape() if grid else ()).to(pl_module.device)

    def _stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._hidden = None, None

    @torch.no_grad()
    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: tuple[Tensor, Tensor],
               batch_idx: int, dataloader_idx: int = 0) -> None:
        """Add a batch's NLL to `metrics`: at every grid point (validation), or of the mixture as it is (test)."""
        model, (input_ids, targets) = self._model(pl_module), batch
        if model is None or self.metrics is None:
            return
        hidden, self._hidden = self._hidden, None  # taken, so a batch never reads an earlier batch's
        with trainer.precision_plugin.forward_context():  # the step's autocast
            if hidden is None or hidden.shape[:2] != input_ids.shape:
                hidden = model(input_ids, return_hidden=True)
            logits = model.head(hidden)
        inputs = cache_inputs(hidden, input_ids)
        if self.metrics.nll_sum.dim():  # the calibration grid
            nll = model.context_cache.grid_nll(logits, hidden, *inputs, targets, IGNORE_INDEX)
            num_tokens = (targets != IGNORE_INDEX).sum()
        else:
            nll, num_tokens = token_nll(model.context_cache(logits, hidden, *inputs), targets)
        num_bytes = pl_module.token_bytes[targets.clamp(min=0)][targets != IGNORE_INDEX].sum()
        self.metrics.update(nll, num_tokens, num_bytes)

    on_validation_batch_end = _score
    on_test_batch_end = _score

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(pl_module, grid=True)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(pl_module, grid=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()
        model, metrics, self.metrics = self._model(pl_module), self.metrics, None
        if model is None or metrics is None:
            return
        calibrated = metrics.compute()  # summed across processes before the best point is chosen
        sharpness, weight, temperature = model.context_cache.set_from_grid(calibrated.pop("index"))
        for name, value in {**calibrated, "sharpness": sharpness, "weight": weight, "temperature": temperature}.items():
            pl_module.log(f"val/cache_{name}", value)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()
        metrics, self.metrics = self.metrics, None
        for name, value in (metrics.compute() if metrics is not None else {}).items():
            pl_module.log(f"test/cache_{name}", value)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()
