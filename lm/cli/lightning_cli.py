"""LightningCLI wiring for `lm fit|validate|test|predict`.

What it adds to Lightning's CLI:
- `--experiment NAME` names the run: TensorBoard logs go to logs/NAME/version_N and checkpoints to
  checkpoints/NAME (a new version never overwrites an older one's logs).
- Two links, so a recipe states each size once: the vocabulary on the data (`data.vocab_size` ->
  `model.config.vocab_size`: the tokenizer is trained up to it) and the context on the model
  (`model.config.max_position_embeddings` -> `data.block_size`: the windows are cut at it). The context goes
  from the model to the data because it is the model's architecture: a checkpoint's context (`--ckpt_path`)
  then also cuts the evaluation windows. A `data.block_size` given anyway is refused in one line naming
  the key to set (`refuse_block_size`, lm/cli/run_checks.py).
- Defaults: TensorBoardLogger, `LastStepCheckpoint` (best `val/loss` + `last.ckpt`), LearningRateMonitor,
  `RNGStateCheckpoint`, `PreemptionCheckpoint`, seed 1234.
- SIGTERM (a preemption: SLURM, Kubernetes, spot instances) stops `fit` at the next step boundary with a
  resumable `last.ckpt` (`PreemptionCheckpoint`) and exits 143, not Lightning's 0.
- `trainer.precision: null` (the CPU recipe's) picks the precision for this machine and says why in
  one log line: bf16-mixed where the hardware has native bf16, else 32-true. A value given wins.
- With `--ckpt_path`, the checkpoint is read once: its model class and saved hyper-parameters
  configure the model (so `lm validate --ckpt_path x.ckpt` needs no model flags; run-time options stay
  the command line's), and its tokenizer goes to the DataModule, so evaluation tokenizes exactly as
  training did.
- `fit` checks checkpoints/ and logs/ before the first step (folders, writable, room for the
  checkpoints) and writes checkpoints with `DurableCheckpointIO`: a failed save stops the run.
- `predict` writes `{prompt, completion}` lines to logs/NAME/predictions.jsonl and prints them.
- `parse_recipe(argv)`: the config `lm fit argv` would run, parsed by the same parser and nothing built
  (`lm plan` reads recipes with it).
- Bad input stops before anything runs, as an `LMError` (lm/cli/run_checks.py): validate/test/predict
  without `--ckpt_path` (unless `--random_weights true`), an empty or reused `--experiment` name, a
  checkpoint that is a folder or not an `lm fit` one, a `data.block_size` given; a command-line or YAML
  mistake is explained by lm/cli/config_errors.py.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm.callbacks import (PREEMPTED_EXIT_STATUS, LastStepCheckpoint, PredictionWriter, PreemptionCheckpoint,
                          RNGStateCheckpoint)
from lm.callbacks.checkpointing import check_run_outputs, use_durable_checkpoint_io
from lm.cli.config_errors import explain_argument_error, explain_build_error
from lm.cli.run_checks import check_run_folders, checked_ckpt_path, refuse_block_size
from lm.data import TextDataModule
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.io.checkpoints import read_checkpoint, require_training_checkpoint
from lm.io.class_paths import import_class
from lm.modules import LanguageModel
from lm.runtime.allocator import keep_large_allocations_in_heap
from lm.runtime.hardware import auto_precision, bf16_is_fast, trains_on_cuda

log = logging.getLogger("lm")


def _warn_of_emulated_bf16(precision: str, accelerator: str) -> None:
    """A bf16 precision chosen on a CPU without native bf16 runs, but its matmuls are emulated (tens of times slower
    than fp32: docs/results/figures.md): say so once, with the setting that trains at full speed."""
    on_cpu = accelerator in ("cpu", "auto") and not trains_on_cuda(accelerator)
    if precision.startswith("bf16") and on_cpu:
        fast, reason = bf16_is_fast("cpu")
        if not fast:
            log.warning(f"trainer.precision {precision}: {reason}. Every step will be many times slower than in "
                        f"32-true: set --trainer.precision 32-true, or leave it null to let lm choose.")


class LMCLI(LightningCLI):
    _checkpoint: Optional[dict[str, Any]] = None  # the --ckpt_path file, read once
    LINK_VOCAB = True  # pre-training: the DataModule's vocab_size is the model's (fine-tuning: the backbone's)
    LINK_CONTEXT = True  # pre-training: the windows are the model's context (fine-tuning: the task data's own)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="default",
                            help="Run name: logs go to logs/<experiment>, checkpoints to checkpoints/<experiment>.")
        parser.add_argument("--random_weights", type=bool, default=False,
                            help="validate/test/predict: run a freshly initialized model without --ckpt_path "
                                 "(a baseline); without this flag a missing --ckpt_path is an error.")
        if self.LINK_VOCAB:
            parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size")
        if self.LINK_CONTEXT:  # a model without config.max_position_embeddings leaves data.block_size at its default
            parser.link_arguments("model.init_args.config.max_position_embeddings", "data.block_size")
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
        """Lightning's parsing; a command-line or YAML mistake becomes one `LMError` naming the key and the fix."""
        argv = list(sys.argv[1:] if args is None else args)
        if self.LINK_CONTEXT:
            refuse_block_size(argv)  # before jsonargparse, which refuses the flag tersely and drops a YAML value
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            subcommands = getattr(self, "_subcommand_parsers", {})  # none when only parsing (lm plan)
            verb = next((a for a in argv if a in subcommands), None)
            raise explain_argument_error(str(error), subcommands.get(verb, parser), argv,
                                         f"lm {verb or ''}".strip()) from error

    def _parse_ckpt_path(self) -> None:
        """Overrides a private LightningCLI method, because Lightning offers no public hook between parsing
        and instantiation, where the checkpoint must configure the model. Lightning's version loads the
        whole checkpoint and applies every saved hyper-parameter as is. Here the file is read once
        (memory-mapped) and kept for the tokenizer, and only the arguments the model class still takes are
        applied: a checkpoint of an older `lm` (which saved, e.g., sampling options) still loads. Parsing
        them applies the links again, so the checkpoint's context also cuts the data's windows."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":  # `fit --ckpt_path last`: the run's own last.ckpt
            experiment = self.config[subcommand].get("experiment")
            ckpt_path = str(Path(self.config[subcommand].checkpoint.dirpath or f"checkpoints/{experiment}") / "last.ckpt")
            if not Path(ckpt_path).is_file():
                return  # nothing to resume yet: Lightning starts from scratch and says so
        if not checked_ckpt_path(ckpt_path, subcommand):
            return
        self._checkpoint = read_checkpoint(ckpt_path)
        require_training_checkpoint(self._checkpoint, ckpt_path)
        hparams = self._checkpoint.get("hyper_parameters", {})
        if "config" not in hparams:
            return
        class_path = hparams.get("_class_path") or "lm.modules.LanguageModel"
        model_class = import_class(class_path)
        accepted = _init_arguments(model_class) - set(getattr(model_class, "RUN_TIME_ARGS", ()))
        init_args = {k: v for k, v in hparams.items() if k in accepted}
        model = {"class_path": class_path, "init_args": init_args}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    @property
    def run_config(self):
        """The parsed config of the verb being run (the whole config when run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.run_config
        check_run_folders(self.subcommand, config)
        _check_single_weight_average(config.trainer.get("callbacks"))
        _name_loggers_after_experiment(config)
        if config.get("weights_only") is False:
            raise LMError("--weights_only false is refused: lm reads checkpoints as tensors and plain values only "
                          "(weights_only=True), so loading a file can never run code. Leave the option out.")
        if "weights_only" in config:
            config.weights_only = True
        if config.trainer.get("precision") is None:
            precision, reason = auto_precision(str(config.trainer.get("accelerator") or "auto"))
            config.trainer.precision = precision
            log.info(f"precision {precision} (trainer.precision was left null: {reason}; set it to override)")
        else:
            _warn_of_emulated_bf16(str(config.trainer.precision), str(config.trainer.get("accelerator") or "auto"))

    def before_fit(self) -> None:
        """Before any step: the output folders take files and have room (a clear error now, not a run that
        trains for hours and saves nothing), and a checkpoint that cannot be written stops the run."""
        check_run_outputs(self.trainer, self.model)
        use_durable_checkpoint_io(self.trainer)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse: a class of the config refused its arguments (e.g. GPTConfig)
            if isinstance(error, LMError) or "Does not validate" not in str(error):
                raise
            raise explain_build_error(error) from error
        config = self.run_config
        checkpoint = self._checkpoint
        init_from = self.model.hparams.get("init_from") if self.subcommand == "fit" else None
        if checkpoint is None and init_from and not self.datamodule.hparams.get("tokenizer_path"):
            checkpoint = read_checkpoint(init_from)  # continued pre-training tokenizes with the initial weights' tokenizer
        if checkpoint is not None and "tokenizer" in checkpoint:
            # Continue / evaluate with the tokenizer the checkpoint was trained with: given to the DataModule,
            # it reaches the model too, which takes the DataModule's tokenizer in its setup().
            self.datamodule.set_tokenizer(Tokenizer.from_str(checkpoint["tokenizer"]))
        if self.subcommand == "predict":
            self.trainer.callbacks.append(PredictionWriter(f"logs/{config.experiment}/predictions.jsonl"))
        # No validation data means nothing to monitor: keep last.ckpt, skip the top-k search.
        if self.subcommand == "fit" and self.datamodule is not None and not self.datamodule.has_validation:
            for callback in self.trainer.callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.monitor == "val/loss":
                    callback.monitor, callback.save_top_k = None, 0  # only last.ckpt


def _init_arguments(cls: type) -> set[str]:
    """Names of the `__init__` arguments of `cls` and its bases (a subclass may forward **kwargs)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
    return names


def _name_loggers_after_experiment(config) -> None:
    """A logger's run name defaults to the experiment's (a logger given in full is left alone); one logger
    or a list of them (e.g. experiments/trainer/wandb.yaml: TensorBoard + W&B)."""
    logger = config.trainer.get("logger")
    for one_logger in logger if isinstance(logger, list) else [logger]:
        if one_logger is None or isinstance(one_logger, bool):
            continue
        init_args = one_logger.get("init_args") if hasattr(one_logger, "get") else None
        if init_args is not None and "name" in init_args and init_args["name"] is None:
            init_args["name"] = config.experiment


def _show_lm_logs() -> None:
    """Print lm's own INFO lines (data cache hits, precision choice) like Lightning prints its own."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_lightning_cli(argv: Optional[list[str]] = None, cli_class: type[LMCLI] = LMCLI, model_class: type = LanguageModel,
                      datamodule_class: type = TextDataModule, subclass_mode_data: bool = False) -> LMCLI:
    """Run `lm <verb> ...`. `argv` None (the `lm` command) lets Lightning read `sys.argv`, which
    multi-process strategies re-run in their child processes; tests pass `argv` instead. `lm finetune`
    passes its own classes (lm/cli/finetune_cli.py)."""
    _show_lm_logs()
    keep_large_allocations_in_heap()  # faster CPU steps (see lm/runtime/allocator.py); LM_DEFAULT_MALLOC=1: off
    try:
        return cli_class(model_class, datamodule_class, args=argv, subclass_mode_data=subclass_mode_data,
                         **_cli_options())
    except MisconfigurationException as error:  # Lightning refusing a setting (e.g. trainer.max_steps -5)
        raise LMError(f"{str(error).strip()} Fix that setting in the YAML or on the command line.") from error
    except SIGTERMException:  # a bare SystemExit (status 0): a preempted job must not look finished to its scheduler
        sys.exit(PREEMPTED_EXIT_STATUS)  # PreemptionCheckpoint has saved last.ckpt and said how to resume


def _cli_options() -> dict[str, Any]:
    """How every `lm` verb builds its LightningCLI (fresh callback instances for each run)."""
    return dict(
        subclass_mode_model=True,
        seed_everything_default=1234,
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step"), RNGStateCheckpoint(),
                                        PreemptionCheckpoint()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lm", "default_env": False, "exit_on_error": False},  # errors: LMCLI.parse_arguments
        auto_configure_optimizers=False,
    )


class _RecipeParser(LMCLI):
    """Parses like `lm fit` and stops: the caller (`lm plan`) only reads the config."""

    def before_instantiate_classes(self) -> None:
        """Keep `trainer.precision: null` as it is: the planned cluster's hardware picks it, not this machine's."""

    def instantiate_classes(self) -> None:
        """Nothing is built."""


def parse_recipe(argv: list[str]):
    """The config `lm fit <argv>` would train with (`--config a.yaml --config b.yaml --key value`, merged,
    linked and defaulted by the same parser), without building the model, the data or the Trainer."""
    saved_argv = sys.argv
    sys.argv = [sys.argv[0]]  # LightningCLI warns when it gets args and sys.argv has some too
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to ...": nothing is run
    saved_level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)
    try:
        return _RecipeParser(LanguageModel, TextDataModule, args=list(argv), run=False, **_cli_options()).config
    finally:
        sys.argv = saved_argv
        seed_logger.setLevel(saved_level)


def _check_single_weight_average(callbacks) -> None:
    """Two weight-averaging callbacks (e.g. a recipe that has EMA + the ema.yaml overlay) are refused by
    Lightning with a traceback at Trainer construction: say it in one line, with the fix."""
    paths = [str(c.get("class_path", "")) if hasattr(c, "get") else type(c).__name__ for c in (callbacks or [])]
    averaging = [p for p in paths if p.rsplit(".", 1)[-1] in ("ExponentialMovingAverage", "EMAWeightAveraging",
                                                             "WeightAveraging", "StochasticWeightAveraging")]
    if len(averaging) > 1:
        raise LMError(f"trainer.callbacks has {len(averaging)} weight-averaging callbacks ({', '.join(averaging)}): "
                      f"Lightning keeps one. The recipe already averages weights: drop the extra overlay "
                      f"(e.g. experiments/trainer/callbacks/ema.yaml on top of experiments/wikitext2_cpu.yaml).")
