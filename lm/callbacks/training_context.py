"""`TrainingContextSchedule`: train on short windows for most of the run, on the full context at the end.

A step on 256-token windows costs less than one on 512-token windows of the same tokens (attention is
quadratic in the window) and, early in training, the model learns about as much from it: a screen of the CPU
recipe with context 256 (batch 8, the same 2,048 tokens per step) gave a 1.8% lower test bpb for the network.
But the context cache, which copies from the whole evaluation window, wants the model used to 512-token
windows (it lost 0.4%). So: short windows while the run's progress is below `until`, full windows after. In
the CPU recipe (256 until 0.85) that took 0.4% off the network's test bpb and 0.5% off the cache's at two seeds
on a CPU without native bf16, 1.6% / 2.1% with native bf16 (docs/results/quality.md, "Round 2").

How a batch is cut: the data gives (B, T) input ids and targets, the targets being the inputs shifted by one
token within each window. `x.reshape(-1, short_context)` cuts every window into T / short_context consecutive
pieces, and piece by piece the targets are still that piece's inputs shifted by one: each piece is a valid
(input, target) pair, and the tokens per step (hence the loss's weighting and `train/tokens_*`) are unchanged.
Each piece is a sequence of its own: it starts at position 0 and attends only within itself.

Progress is the LR schedule's own (`LanguageModel.schedule_progress`): by optimizer steps, by wall-clock
under `trainer.max_time`, or whichever is further along. It is derived from the step counter and Lightning's
Timer, both restored by a resume, so the callback keeps no state: a resumed run goes on in the right phase.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lm.errors import LMError


def split_windows(batch: tuple[Tensor, Tensor], context: Optional[int]) -> tuple[Tensor, Tensor]:
    """A training batch of (B, T) input ids and targets as (B * T / context, context) windows (None: as given).

    Valid because the targets are the inputs shifted by one within each window (see the module docstring)."""
    input_ids, targets = batch
    if context is None:
        return input_ids, targets
    check_short_context(context, input_ids.shape[-1])
    return input_ids.reshape(-1, context), targets.reshape(-1, context)


def check_short_context(short_context: int, window: int) -> None:
    """LMError unless `short_context` cuts windows of `window` tokens into two or more equal pieces."""
    if short_context >= window:
        raise LMError(f"TrainingContextSchedule short_context={short_context} is not shorter than the training windows "
                      f"({window} tokens, the model's max_position_embeddings): nothing to shorten. Set a divisor of "
                      f"{window} below it (e.g. {window // 2}), or drop the callback.")
    if window % short_context:
        divisor = max(d for d in range(1, short_context) if window % d == 0)
        raise LMError(f"TrainingContextSchedule short_context={short_context} does not divide the training windows "
                      f"of {window} tokens (the model's max_position_embeddings): set a divisor of {window}, "
                      f"e.g. {divisor}.")


class TrainingContextSchedule(Callback):
    """Train on `short_context`-token windows until the run's progress reaches `until`, then on full windows.

    Each training batch (B, T) becomes (B * T / short_context, short_context) (`split_windows`): same tokens per
    step. Validation and test windows are never changed. The window length the network received is logged as
    `train/context` with the step scalars, and the switch is logged once at info level.

    Needs an `lm.modules.LanguageModel` (its `training_context`, applied in `training_step`, and its
    `schedule_progress`); a subclass whose own `training_step` ignores `training_context` is refused at its
    first short batch rather than silently trained on full windows.

    Args:
        short_context: Window length, in tokens, of the first part of the run; it must divide the model's
            context (`model.config.max_position_embeddings`). A model whose context is not longer is trained
            on full windows throughout, with a warning (a recipe that has this callback, run at a small context).
        until: Progress of the run (0 -> 1, as the LR schedule measures it) from which full windows are used;
            0 never shortens, 1 shortens the whole run.
    """

    def __init__(self, short_context: int = 256, until: float = 0.85) -> None:
        super().__init__()
        if short_context < 1:
            raise LMError(f"TrainingContextSchedule short_context must be >= 1 token, got {short_context}: e.g. 256 "
                          f"for a 512-token model.")
        if not 0.0 <= until <= 1.0:
            raise LMError(f"TrainingContextSchedule until is a fraction of the run in [0, 1], got {until}: e.g. 0.85 "
                          f"(short windows for the first 85%).")
        self.short_context = short_context
        self.until = until
        self._decided_at_step: Optional[int] = None  # the optimizer step the current window length is for
        self._received: Optional[int] = None  # window length of the network's last training forward
        self._hook: Optional[Any] = None
        self._off = False  # the model's context is not longer than short_context (see setup)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not (hasattr(pl_module, "training_context") and callable(getattr(pl_module, "schedule_progress", None))):
            raise LMError(f"TrainingContextSchedule needs an lm.modules.LanguageModel (training_context and "
                          f"schedule_progress); the model is a {type(pl_module).__name__}: drop the callback.")
        if sum(isinstance(c, TrainingContextSchedule) for c in trainer.callbacks) > 1:
            raise LMError("Two TrainingContextSchedule callbacks (e.g. experiments/trainer/callbacks/"
                          "short_context_schedule.yaml stacked on experiments/wikitext2_cpu.yaml, which has one): "
                          "keep one, and set its short_context/until there.")
        context = getattr(getattr(pl_module, "config", None), "max_position_embeddings", None)
        self._off = context is not None and self.short_context >= context
        if self._off:  # e.g. the CPU recipe (which has this callback) run with a smaller model context
            rank_zero_warn(f"TrainingContextSchedule: the model's context ({context} tokens) is not longer than "
                           f"short_context={self.short_context}: training on full windows throughout.")
        elif context is not None:  # the training windows (lm fit links data.block_size to it)
            check_short_context(self.short_context, context)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._decided_at_step = None
        network = getattr(pl_module, "model", pl_module)  # the transformer: also reached by paths skipping forward()
        self._hook = network.register_forward_pre_hook(self._record_window, with_kwargs=True)

    def _record_window(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = args[0] if args else kwargs.get("input_ids")
        if module.training and isinstance(input_ids, Tensor):
            self._received = int(input_ids.shape[-1])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._off:
            return
        if step == self._decided_at_step:  # the micro-batches of one accumulated step share its window length
            return
        progress = pl_module.schedule_progress(step)
        context = self.short_context if progress < self.until else None
        if self._decided_at_step is None:
            rank_zero_info(f"TrainingContextSchedule: training on {self.short_context}-token windows until progress "
                           f"{self.until:g}, then on full windows; now at {max(progress, 0.0):.2f} (step {step}).")
        elif context != pl_module.training_context:
            rank_zero_info(f"TrainingContextSchedule: progress {progress:.2f} >= {self.until:g} at step {step}: "
                           f"training on full windows from now on.")
        pl_module.training_context = context
        self._decided_at_step = step
        self._received = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._received is None:  # no training forward seen (e.g. a step skipped by the model)
            return
        wanted = pl_module.training_context
        if wanted is not None and self._received != wanted:
            raise LMError(f"TrainingContextSchedule: {type(pl_module).__name__}.training_step ignores training_context "
                          f"(the network received {self._received}-token windows, not {wanted}): drop the callback, "
                          f"or cut the batch with lm.callbacks.training_context.split_windows in that training_step.")
        pl_module.log("train/context", float(self._received), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop(pl_module)

    def _stop(self, pl_module: LightningModule) -> None:
        """Full windows again (the module may be trained further without this callback) and the hook removed."""
        if hasattr(pl_module, "training_context"):
            pl_module.training_context = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
