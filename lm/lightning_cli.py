"""LightningCLI wiring for `lm fit|validate|test|predict`.

What it adds to Lightning's CLI:
- `--experiment NAME` names the run: TensorBoard logs go to logs/NAME/version_N and checkpoints to
  checkpoints/NAME (a new version never overwrites an older one's logs).
- `data.vocab_size` is linked to `model.config.vocab_size`: set it once, on the data.
- Defaults: TensorBoardLogger, ModelCheckpoint (best `val/loss` + `last.ckpt`), LearningRateMonitor,
  seed 1234.
- `validate`/`test`/`predict` with `--ckpt_path` use the tokenizer stored in the checkpoint, so
  evaluation always tokenizes exactly as training did.
- `predict` writes `{prompt, completion}` lines to logs/NAME/predictions.jsonl and prints them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lm.callbacks import LastStepCheckpoint
from lm.checkpoint import import_class, read_checkpoint
from lm.data import TextDataModule
from lm.modules import LanguageModel


class PredictionWriter(BasePredictionWriter):
    """Writes every generated completion as one JSON line, and echoes it to the terminal."""

    def __init__(self, output_path: str) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        if trainer.world_size > 1:
            self.output_path = self.output_path.with_name(f"{self.output_path.stem}.rank{trainer.global_rank}.jsonl")
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.output_path)
        for row in rows:
            print(f"\n>>> {row['prompt']}\n{row['completion']}")
        print(f"\nWrote {len(rows)} completions to {self.output_path}")


class LMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="default",
                            help="Run name: logs go to logs/<experiment>, checkpoints to checkpoints/<experiment>.")
        parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size")
        parser.add_lightning_class_args(LastStepCheckpoint, "checkpoint")
        parser.set_defaults({
            "model": {"class_path": "lm.modules.LanguageModel"},  # `--model my_pkg.MyModel` swaps it
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True,
            "checkpoint.filename": "step{step:06d}-val_loss{val/loss:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "trainer.logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": None},
            },
        })
        parser.link_arguments("experiment", "checkpoint.dirpath", compute_fn=lambda name: f"checkpoints/{name}")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Multi-process strategies (ddp, fsdp, model parallel) re-run this very command line in each
        # child process: give sys.argv its arguments back once they are parsed.
        if _COMMAND_LINE is not None:
            sys.argv = list(_COMMAND_LINE)

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, take the model class and its saved hyper-parameters (architecture,
        optimizer, a subclass's own arguments) from the checkpoint, so `lm validate --ckpt_path x.ckpt`
        needs no model flags.

        Lightning's version applies *all* saved hyper-parameters over the command line; here the
        run-time options (`LanguageModel.RUN_TIME_ARGS`: sampling, compile, fused AdamW) stay this
        run's, so e.g. `--model.temperature 0` at predict time is not silently replaced.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
        if "config" not in hparams:
            return
        class_path = hparams.get("_class_path")
        model_class = import_class(class_path) if class_path else LanguageModel
        keep = set(getattr(model_class, "RUN_TIME_ARGS", ()))
        init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in keep}
        model: dict[str, Any] = {"init_args": init_args}
        if class_path:
            model["class_path"] = class_path
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    @property
    def run_config(self):
        """The parsed config of the verb being run (the whole config when run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.run_config
        # The logger's run name defaults to the experiment's (a logger given in full is left alone).
        logger = config.trainer.get("logger")
        # One logger or a list of them (e.g. experiments/trainer/wandb.yaml: TensorBoard + W&B).
        for one_logger in logger if isinstance(logger, list) else [logger]:
            if one_logger is None or isinstance(one_logger, bool):
                continue
            init_args = one_logger.get("init_args") if hasattr(one_logger, "get") else None
            if init_args is not None and "name" in init_args and init_args["name"] is None:
                init_args["name"] = config.experiment
        ckpt_path = config.get("ckpt_path")
        # A sharded (distributed) checkpoint is a directory.
        if self.subcommand != "fit" and ckpt_path and not Path(ckpt_path).exists():
            raise FileNotFoundError(
                f"Checkpoint not found: {ckpt_path}. Runs write them to checkpoints/<experiment>/ "
                f"(e.g. checkpoints/{config.experiment}/last.ckpt)."
            )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.run_config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":  # `fit --ckpt_path last`: Lightning resumes from the callback's last.ckpt
            ckpt_path = str(Path(config.checkpoint.dirpath or f"checkpoints/{config.experiment}") / "last.ckpt")
        if ckpt_path and Path(ckpt_path).is_file():
            # Evaluate / continue with the tokenizer the checkpoint was trained with.
            checkpoint = read_checkpoint(ckpt_path)
            if "tokenizer" in checkpoint:
                from lm.data.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
                self.model.set_tokenizer(tokenizer)
                if hasattr(self.datamodule, "set_tokenizer"):
                    self.datamodule.set_tokenizer(tokenizer)
        if self.subcommand == "predict":
            self.trainer.callbacks.append(PredictionWriter(f"logs/{config.experiment}/predictions.jsonl"))
        # No validation data means nothing to monitor: keep last.ckpt, skip the top-k search.
        if self.subcommand == "fit" and self.datamodule is not None and not self.datamodule.has_validation:
            for callback in self.trainer.callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.monitor == "val/loss":
                    callback.monitor, callback.save_top_k = None, 0  # only last.ckpt


def _show_lm_logs() -> None:
    """Print lm's own INFO lines (data cache hits, tokenization timings) like Lightning prints its own."""
    lm_logger = logging.getLogger("lm")
    if not lm_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        lm_logger.addHandler(handler)
        lm_logger.setLevel(logging.INFO)
        lm_logger.propagate = False


_COMMAND_LINE: list[str] | None = None  # sys.argv of a real `lm <verb> ...` command, restored after parsing


def run_lightning_cli(argv: list[str]) -> LMCLI:
    global _COMMAND_LINE
    _show_lm_logs()
    from lm.allocator import keep_large_allocations_in_heap

    keep_large_allocations_in_heap()  # ~10% faster CPU steps (see lm/allocator.py); LM_DEFAULT_MALLOC=1: off
    # Run from a shell, sys.argv[1:] is argv; DDP's launcher re-runs sys.argv in its child processes, so it is
    # put back after parsing (LMCLI.parse_arguments). Called from Python (tests), sys.argv is someone else's.
    _COMMAND_LINE = [sys.argv[0], *argv] if sys.argv[1:] == list(argv) else None
    # LightningCLI reads sys.argv when args is None and warns when both are given (e.g. in tests).
    sys.argv = [sys.argv[0]]
    return LMCLI(
        LanguageModel,
        TextDataModule,
        subclass_mode_model=True,
        seed_everything_default=1234,
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step")]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lm", "default_env": False},
        args=argv,
        auto_configure_optimizers=False,
    )
