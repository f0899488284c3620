"""`LateDropout`: no dropout for the first part of the run, the recipe's rates after it.

Dropout fights over-fitting, which a small corpus read for many epochs needs at the end of a run, but early on,
while the network is far from fitting its text, dropout only slows it down (Liu et al., 2023, "Dropout Reduces
Underfitting", call this "late dropout"). A screen of the CPU recipe (750 steps, native bf16, seed 1234) with
dropout off until 30% of the run: test bpb 2.0902 -> 2.0809 for the network and 1.8986 -> 1.8865 with the context
cache; seed 1235: 2.0948 -> 2.0858 and 1.9021 -> 1.8894. A full native-bf16 `make train` (1,210 steps, 10
epochs) with it scored 2.0580 / 1.8602 against 2.0540-2.0553 / 1.8604-1.8611 without: not in the recipe yet
(docs/results/quality.md, "Late dropout"; the overlay experiments/trainer/callbacks/late_dropout.yaml adds it).

What it switches: the network's `nn.Dropout` modules (`GPTConfig.dropout`: the embeddings' output and every
residual branch), set to p = 0 before `start` and back to their built rate from `start` on. Left as they are:
`attention_dropout` (which is `dropout` when left unset; the CPU recipe sets it to 0) and `embedding_dropout`
(whole token types dropped from the input), which are not `nn.Dropout` modules. Validation, test and every verb
after training run in eval mode, without dropout either way.

Progress is the LR schedule's own (`LanguageModel.schedule_progress`), as for `TrainingContextSchedule`: it is
derived from the step counter and Lightning's Timer, both restored by a resume, so nothing of the callback needs
saving: it finds the dropout modules and their rates again when training starts.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lm.errors import LMError


class LateDropout(Callback):
    """The network's dropout off until the run's progress reaches `start`, at its configured rates after.

    Args:
        start: Progress of the run (0 -> 1, as the LR schedule measures it) from which dropout is on; 0 is the
            plain recipe, 1 trains without dropout.
    """

    def __init__(self, start: float = 0.3) -> None:
        super().__init__()
        if not 0.0 <= start <= 1.0:
            raise LMError(f"LateDropout start is a fraction of the run in [0, 1], got {start}: e.g. 0.3 (no dropout "
                          f"for the first 30%).")
        self.start = start
        self._rates: Optional[list[tuple[nn.Dropout, float]]] = None  # each dropout module and its built rate
        self._on: Optional[bool] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "schedule_progress", None)):
            raise LMError(f"LateDropout needs an lm.modules.LanguageModel (its schedule_progress); the model is a "
                          f"{type(pl_module).__name__}: drop the callback.")
        if sum(isinstance(c, LateDropout) for c in trainer.callbacks) > 1:
            raise LMError("Two LateDropout callbacks (e.g. experiments/trainer/callbacks/late_dropout.yaml stacked on "
                          "experiments/wikitext2_cpu.yaml, which has one): keep one, and set its start there.")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The dropout modules, found once the network exists (`LanguageModel.configure_model` runs after setup)."""
        network = getattr(pl_module, "model", pl_module)
        self._rates = [(module, module.p) for module in network.modules() if isinstance(module, nn.Dropout)]
        self._on = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        progress = pl_module.schedule_progress(trainer.global_step)
        on = progress >= self.start
        if on == self._on:
            return
        for module, rate in self._rates or ():
            module.p = rate if on else 0.0
        rates = sorted({rate for _, rate in self._rates or ()})
        rank_zero_info(f"LateDropout: dropout {'on at ' + str(rates) if on else 'off'} from step {trainer.global_step} "
                       f"(progress {max(progress, 0.0):.2f}; on from {self.start:g}).")
        self._on = on

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The modules get their built rates back: the model object is left as the recipe made it."""
        for module, rate in self._rates or ():
            module.p = rate
        self._on = None
