"""`TextSampler`: completions of fixed prompts every N steps, logged as text (TensorBoard TEXT tab, W&B table)."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lm.errors import LMError
from lm.model.sampling import SamplingOptions


class TextSampler(Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training), complete `prompts` with
    the model being trained and log them as text.

    TensorBoard: one markdown entry per sampling step under `tag` (TEXT tab; stored as the tensor
    `<tag>/text_summary`). Loggers without `add_text` but with `log_text` (W&B) get a table with
    columns step / prompt / completion. The samples are also kept in `self.history` and, with
    `verbose`, printed.

    Sampling uses its own seeded generator: it does not consume the training RNG, so runs with and
    without this callback train identically. Generation runs on rank 0 only, which is fine for
    single-device and DDP training (not for sharded models, whose forward needs every rank).

    Args:
        prompts: Text prompts, completed as one batch.
        every_n_steps: Sample when `trainer.global_step` is a multiple of this (0: only at the end).
        sampling: How to sample (`SamplingOptions`). Default: 32 new tokens, seed 1234 (the same seed at
            every step, so samples differ only by training), prompts left-truncated to fit the context.
        tag: Text tag in the logger.
        on_train_end: Also sample once when training ends (if the last step was not sampled already).
        verbose: Print the samples too.
    """

    def __init__(self, prompts: list[str] = ["The", " = = History = ="], every_n_steps: int = 100,
                 sampling: Optional[SamplingOptions] = None, tag: str = "samples", on_train_end: bool = True,
                 verbose: bool = False) -> None:
        super().__init__()
        if not prompts:
            raise LMError("TextSampler needs at least one prompt.")
        if every_n_steps < 0:
            raise LMError(f"every_n_steps must be >= 0, got {every_n_steps}.")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.sampling = sampling or SamplingOptions(max_new_tokens=32, seed=1234, truncate=True)
        self.tag = tag
        self.sample_on_train_end = on_train_end
        self.verbose = verbose
        self.history: list[tuple[int, list[str]]] = []
        self._last_sampled_step = -1

    def sample(self, pl_module: LightningModule) -> list[str]:
        from lm.model.generation import generate_text

        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise LMError("TextSampler: the module has no tokenizer (it is set from the DataModule in setup).")
        model = pl_module.model
        max_new = min(self.sampling.max_new_tokens, model.config.max_position_embeddings - 1)
        return generate_text(model, tokenizer, self.prompts, self.sampling, max_new_tokens=max_new)

    @rank_zero_only
    def _sample_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_sampled_step:
            return
        self._last_sampled_step = step
        completions = self.sample(pl_module)
        self.history.append((step, completions))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
                experiment.add_text(self.tag, self.format_markdown(completions), global_step=step)
            elif hasattr(logger, "log_text"):  # W&B
                logger.log_text(key=self.tag, columns=["step", "prompt", "completion"],
                                data=[[step, p, c] for p, c in zip(self.prompts, completions)], step=step)
        if self.verbose:
            lines = "\n".join(f"  {p!r} -> {c!r}" for p, c in zip(self.prompts, completions))
            rank_zero_info(f"Samples at step {step}:\n{lines}")

    def format_markdown(self, completions: list[str]) -> str:
        """One fenced block per prompt: the prompt, then the completion after a `▶` marker."""
        blocks = []
        for prompt, completion in zip(self.prompts, completions):
            text = f"{prompt}▶{completion}".replace("```", "'''")
            blocks.append(f"```\n{text}\n```")
        return "\n\n".join(blocks)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sample_on_train_end and trainer.global_step > 0:
            self._sample_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_sampled_step": self._last_sampled_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_sampled_step = state_dict.get("last_sampled_step", -1)
