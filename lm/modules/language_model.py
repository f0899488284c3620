"""`LanguageModel`: the LightningModule for pre-training a GPT.

It wires four things and nothing else: the hand-written `GPT` (lm/model), the training objective,
token-weighted loss / perplexity / bits-per-byte (lm/evaluation/token_metrics.py) and the optimizer with its
schedule (lm/modules/optimizers.py: Muon + AdamW or AdamW, WSD or warm-up + cosine). The tokenizer travels inside every checkpoint, so a `.ckpt` file alone is
enough to evaluate or generate.

Objective vs metrics: `compute_loss` is the objective training minimizes, and a subclass may change
it (label smoothing, z-loss, ...). Validation and test metrics never use it: `val/*` and `test/*` are
always the plain token negative log-likelihood of the logits (`lm.evaluation.token_losses.token_nll`), so perplexity
and bits-per-byte stay comparable between runs whatever they trained on. With a context cache
(`GPTConfig.context_cache`), `configure_callbacks` adds its calibration (lm/callbacks/context_cache_calibration.py),
which logs the mixture's figures as `val/cache_*` and `test/cache_*`; `val/*` and `test/*` stay the network's.

Hooks meant for subclasses (select one with `--model my_pkg.MyModel` or `class_path` in YAML):
- `build_model(config)`: return your own `nn.Module` (e.g. a GPT with a custom attention);
- `compute_loss(logits, targets)`: change the training objective;
- `configure_optimizers()`: another optimizer or schedule.

Memory levers (run-time choices, not saved in checkpoints; docs/training-engine.md, "Memory levers"):
- `activation_checkpointing`: every transformer block is recomputed in the backward pass (`GPT`'s
  attribute of that name, torch.utils.checkpoint) on any strategy but FSDP1, whose own
  `activation_checkpointing_policy` does it;
- `loss_chunk_size`: the LM head and the cross-entropy run that many tokens at a time
  (`chunked_token_nll`), so no step holds the whole (batch x time x vocab) float32 logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lm.callbacks.context_cache_calibration import ContextCacheCalibration
from lm.callbacks.training_context import split_windows
from lm.errors import LMError
from lm.evaluation.token_losses import IGNORE_INDEX, token_nll
from lm.evaluation.token_metrics import LanguageModelingMetrics
from lm.model import GPT, GPTConfig, SamplingOptions, build_gpt, generate_text
from lm.model.context_cache import ContextCache
from lm.model.layers import make_norm
from lm.modules.copy_distillation import copy_distillation_loss
from lm.modules.temperature_calibration import (TEMPERATURES, check_foldable, check_full_state_dict, fold_temperature,
                                                summed_nll_by_temperature, unfold_temperature)
from lm.modules.optimizers import (MUON_OPTIMIZERS, OptimizerName, Schedule, build_optimizer, lr_multiplier,
                                   step_progress)


class LanguageModel(L.LightningModule):
    """Causal language modelling with a GPT.

    Checkpoints keep every `__init__` argument except those in `RUN_TIME_ARGS`, which are choices of
    the run at hand (so `lm predict --ckpt_path x.ckpt --model.sampling.temperature 0` is not replaced by
    the checkpoint's); a subclass adds its own run-time options to the tuple.

    Args:
        config: The transformer's shape and variants (see `GPTConfig`). Its `vocab_size` is linked to
            `data.vocab_size` by the CLI.
        learning_rate: Peak learning rate reached after warm-up.
        min_learning_rate: Where the decay ends; default `learning_rate / 10`.
        weight_decay: Decoupled weight decay for linear weights (norms, biases and embeddings get none).
        betas: AdamW betas.
        optimizer: `adamw`, or `muon`: Muon for the hidden weight matrices and AdamW for the rest, at the
            same learning rate (`lm.modules.optimizers.MuonWithAdamW`); `normuon` / `muon_polar_express`:
            the same with NorMuon's row normalization / Polar Express's orthogonalization.
        adamw_lr_ratio: With a Muon optimizer, the learning rate of AdamW's groups (embeddings, the LM head,
            norms, biases) as a multiple of `learning_rate` (Muon's); the schedule scales both alike.
        warmup_steps: Optimizer steps of linear warm-up.
        max_steps: Steps over which the LR decays; default: the Trainer's total optimizer steps.
        schedule: After warm-up, `cosine` decay or `wsd` (warmup-stable-decay: constant, then a linear
            cooldown over the last `cooldown_fraction` of the run). See `lm.modules.optimizers.lr_multiplier`.
        cooldown_fraction: `wsd`: the share of the run spent cooling down, in (0, 1]; 1.0 is a linear decay
            from the peak right after warm-up.
            A run bounded by `trainer.max_time` decays by wall-clock: the schedule reaches its end when the
            time runs out (or when max_steps or max_epochs end it, whichever comes first).
        fused_adamw: Use the fused AdamW kernel (default: where the device has one).
        compile: Compile the transformer with `torch.compile` (slow first step, faster after; GPU mostly).
        sampling: `lm predict`: how to complete the prompts (`SamplingOptions`; batch i of a run uses
            seed + i).
        init_from: `lm fit`: start from this checkpoint's weights (new optimizer and schedule); it must
            have this run's architecture and tokenizer (lm/modules/init_from.py).
        activation_checkpointing: Recompute each transformer block in the backward pass instead of keeping
            its activations (about one more forward per step, a fraction of the activation memory). Not
            with FSDPStrategy's own `activation_checkpointing_policy` (choose one).
        loss_chunk_size: Compute the LM head and the cross-entropy this many tokens at a time, recomputing
            each chunk's logits in the backward pass (one more head forward per step), so a step never
            holds the (batch x time x vocab) float32 logits; None: all tokens at once. Same loss, same
            gradients, same `val/*` and `test/*`.
        multi_token_prediction: Train n extra heads, head k predicting the token k + 1 places ahead from the same
            final hidden state (multi-token prediction, Gloeckle et al. 2024): each is `FutureTokenHead` (h + W
            norm(h), W starting at zero) read by the network's own LM head. They are training-only: they live in
            this module, not in the network, so evaluation, generation and every export see the plain GPT (a
            resumed run trains them on). The objective becomes the next-token loss plus `multi_token_weight` x
            the heads' mean loss (logged as `train/future_loss`); `val/*` and `test/*` stay the network's. 0: off.
        multi_token_weight: Weight of the future heads' mean loss in the objective.
        calibrate_temperature: Pick the network's softmax temperature on each validation (logged as
            `val/temperature`, `val/calibrated_loss`, `val/calibrated_bpb`) and fold it into every saved
            checkpoint's final norm, so every verb after training uses the calibrated network; training and a
            resumed fit use the trained weights (lm/modules/temperature_calibration.py).
        copy_distillation: Share of the objective (in [0, 1)) given to the context cache's copy distribution as a
            soft target: the network learns to copy from its window on its own (lm/modules/copy_distillation.py).
            Training-only: the network and every verb after training are unchanged. 0: off.
        copy_distillation_until: None: `copy_distillation` holds for the whole run. A fraction f in (0, 1]: the
            share decays linearly from `copy_distillation` to 0 at progress f of the run (`schedule_progress`, the
            LR schedule's), and the rest of the run trains on the plain objective alone (logged as
            `train/copy_distillation`).
    """

    # Choices of the run at hand, not of the weights: a resumed run takes them from its own command line.
    RUN_TIME_ARGS: tuple[str, ...] = ("compile", "fused_adamw", "sampling", "activation_checkpointing",
                                      "loss_chunk_size")

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        learning_rate: float = 1e-3,
        min_learning_rate: Optional[float] = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        optimizer: OptimizerName = "adamw",
        adamw_lr_ratio: float = 1.0,
        warmup_steps: int = 100,
        max_steps: Optional[int] = None,
        schedule: Schedule = "cosine",
        cooldown_fraction: float = 0.2,
        fused_adamw: Optional[bool] = None,
        compile: bool = False,
        sampling: Optional[SamplingOptions] = None,
        init_from: Optional[str] = None,
        activation_checkpointing: bool = False,
        loss_chunk_size: Optional[int] = None,
        multi_token_prediction: int = 0,
        multi_token_weight: float = 0.5,
        calibrate_temperature: bool = False,
        copy_distillation: float = 0.0,
        copy_distillation_until: Optional[float] = None,
    ) -> None:
        super().__init__()
        _check_optimizer_settings(learning_rate, min_learning_rate, weight_decay, warmup_steps, cooldown_fraction,
                                  optimizer, adamw_lr_ratio)
        self._check_loss_chunk_size(loss_chunk_size)
        # A dict when reloaded from a checkpoint's plain hyper-parameters; copied either way so the
        # shared default instance is never mutated.
        self.config = GPTConfig.from_dict(config if isinstance(config, dict) else config.to_dict())
        # Checkpoints are read with torch.load(weights_only=True): keep hyper-parameters plain types.
        self.save_hyperparameters(ignore=["config", *self.RUN_TIME_ARGS])
        self.hparams["config"] = self.config.to_dict()
        self.fused_adamw = fused_adamw
        self.compile_model = compile
        self.sampling = SamplingOptions.resolve(sampling)
        self.model = self.build_model(self.config)
        self.activation_checkpointing = self._set_activation_checkpointing(activation_checkpointing)
        if loss_chunk_size is not None:
            self._require_head("loss_chunk_size")
        self.loss_chunk_size = loss_chunk_size
        self.future_heads = self._future_heads(multi_token_prediction, multi_token_weight)
        self.copy_distillation = self._check_copy_distillation(copy_distillation, copy_distillation_until)
        self.copy_distillation_until = copy_distillation_until
        self.calibrate_temperature = calibrate_temperature
        self.network_temperature: Optional[float] = None  # the last validation's pick (calibrate_temperature)
        self.temperature_metrics = self._temperature_metrics(calibrate_temperature)
        self.tokenizer = None  # the DataModule's, given in setup(): see set_tokenizer
        # Training windows shorter than the data's (same tokens per step), set per step by
        # lm.callbacks.TrainingContextSchedule; None: the batches as they come. Never applied to validation/test.
        self.training_context: Optional[int] = None
        self.register_buffer("token_bytes", torch.zeros(self.config.vocab_size, dtype=torch.long), persistent=False)
        self.val_metrics = LanguageModelingMetrics()
        self.test_metrics = LanguageModelingMetrics()
        self._compiled = False
        self._sharded = False

    def _set_activation_checkpointing(self, enabled: bool) -> bool:
        if enabled:
            if not hasattr(self.model, "activation_checkpointing"):
                raise LMError(f"model.activation_checkpointing needs a network with an `activation_checkpointing` "
                              f"attribute (as lm.model.GPT has); {type(self).__name__}.build_model returned a "
                              f"{type(self.model).__name__}. Drop the option, or add the attribute to the network.")
            self.model.activation_checkpointing = True
        return enabled

    def _future_heads(self, count: int, weight: float) -> nn.ModuleList:
        """Multi-token prediction's heads (`multi_token_prediction`), checked. Training-only: they are not part of
        the network (lm.io.checkpoints.load_model reads `model.*` alone, so every verb after training sees the plain
        GPT); head k predicts the token k + 1 places ahead from the same hidden state through the shared LM head."""
        if count < 0 or not weight >= 0:
            raise LMError(f"model.multi_token_prediction must be >= 0 (extra future tokens to predict) and "
                          f"model.multi_token_weight >= 0, got {count} and {weight}.")
        if count and self.loss_chunk_size is not None:
            raise LMError("model.multi_token_prediction needs the plain loss path: drop model.loss_chunk_size.")
        if count:
            self._require_head("multi_token_prediction")
        return nn.ModuleList(FutureTokenHead(self.config) for _ in range(count))

    def _check_copy_distillation(self, weight: float, until: Optional[float]) -> float:
        if not 0 <= weight < 1:
            raise LMError(f"model.copy_distillation is the soft target's share of the objective, in [0, 1), got {weight}.")
        if until is not None and not 0 < until <= 1:
            raise LMError(f"model.copy_distillation_until is the fraction of the run at which copy distillation's "
                          f"share reaches 0, in (0, 1], got {until}: e.g. 0.5, or null to keep it.")
        if until is not None and not weight:
            raise LMError("model.copy_distillation_until schedules copy distillation, which is off: set "
                          "model.copy_distillation too (e.g. 0.15), or drop copy_distillation_until.")
        if weight and self.loss_chunk_size is not None:
            raise LMError("model.copy_distillation needs the whole logits of a batch: drop model.loss_chunk_size.")
        if weight and type(self).compute_loss is not LanguageModel.compute_loss:
            raise LMError(f"model.copy_distillation mixes its soft target into the plain cross-entropy, but "
                          f"{type(self).__name__} overrides compute_loss (its own objective): drop the option for "
                          f"this model.")
        if weight:
            self._require_head("copy_distillation")
        return weight

    def _temperature_metrics(self, calibrate: bool) -> Optional[LanguageModelingMetrics]:
        """The validation NLL at each of `TEMPERATURES` (calibrate_temperature), checked."""
        if not calibrate:
            return None
        check_foldable(self.model)
        return LanguageModelingMetrics(grid_shape=(len(TEMPERATURES),))

    def _require_head(self, option: str) -> None:
        """`model.<option>` reads the network's final hidden states (`return_hidden`) and applies its `head`."""
        if not callable(getattr(self.model, "head", None)):
            raise LMError(f"model.{option} needs a network with a `head` method and `return_hidden` (as lm.model.GPT "
                          f"has); {type(self).__name__}.build_model returned a {type(self.model).__name__}. Drop the "
                          f"option for this network.")

    # ------------------------------------------------------------------------------ subclass hooks
    def build_model(self, config: GPTConfig) -> nn.Module:
        """The network: any module mapping ids (B, T) to logits (B, T, vocab)."""
        return build_gpt(config)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The training objective: here the mean token cross-entropy over the scored targets.

        Override it to train on something else; validation and test metrics are not affected."""
        nll, num_tokens = token_nll(logits, targets)
        return nll / num_tokens.clamp(min=1)

    def _check_loss_chunk_size(self, loss_chunk_size: Optional[int]) -> None:
        """A chunk is a positive number of tokens, and the chunked path computes the plain cross-entropy from
        the network's hidden states: a subclass with its own objective over the full logits cannot use it."""
        if loss_chunk_size is None:
            return
        if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            raise LMError(f"model.loss_chunk_size must be a positive number of tokens (e.g. 1024), or null for all "
                          f"tokens at once; got {loss_chunk_size!r}.")
        own = [name for name in ("compute_loss", "training_step")
               if getattr(type(self), name) is not getattr(LanguageModel, name)]
        if own:
            raise LMError(f"model.loss_chunk_size computes the plain cross-entropy chunk by chunk, but "
                          f"{type(self).__name__} overrides {' and '.join(own)} (its own objective over the full "
                          f"logits): drop --model.loss_chunk_size for this model.")

    # --------------------------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer) -> None:
        """Use `tokenizer` (its byte lengths make bits-per-byte). `setup` calls it with the DataModule's,
        which the CLI loads from the checkpoint when there is one: the one way a tokenizer gets here."""
        if tokenizer.vocab_size > self.config.vocab_size:
            raise LMError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}: set --data.vocab_size (linked to the model) to at least {tokenizer.vocab_size}."
            )
        self.tokenizer = tokenizer
        lengths = torch.zeros(self.config.vocab_size, dtype=torch.long)
        lengths[: tokenizer.vocab_size] = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
        self.token_bytes = lengths.to(self.token_bytes.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        if getattr(datamodule, "tokenizer", None) is not None and datamodule.tokenizer is not self.tokenizer:
            self.set_tokenizer(datamodule.tokenizer)
        if stage == "fit" and self.calibrate_temperature:
            check_full_state_dict(getattr(attached_trainer(self), "strategy", None))
        if stage == "fit" and self.hparams.get("init_from"):
            from lm.modules.init_from import load_initial_weights

            load_initial_weights(self, self.hparams.init_from)

    def configure_model(self) -> None:
        """Shard and/or compile the network. Lightning calls this once the strategy is set up, before
        the optimizer is built (so the optimizer sees the sharded parameters).

        - Under `ModelParallelStrategy` (`experiments/trainer/fsdp2_cpu.yaml`) the module has a device
          mesh: FSDP2 `fully_shard` is applied to every transformer `Block`, then to the whole network
          (embeddings, final norm and the tied head form the root group). Without a mesh (1 process,
          DDP, Lightning's FSDPStrategy which wraps by itself) nothing is sharded here.
        - `compile=True` compiles the network *in place* (`nn.Module.compile`), after sharding: the
          parameter names stay `model.…`, so checkpoints of a compiled run load into an uncompiled model.
        """
        mesh = self.device_mesh
        if mesh is not None and not self._sharded:
            from torch.distributed.fsdp import fully_shard

            from lm.model.layers import Block

            if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
                raise LMError("LanguageModel shards with FSDP2 only: use ModelParallelStrategy(tensor_parallel_size=1).")
            dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            for block in [m for m in self.model.modules() if isinstance(m, Block)]:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(self.model, mesh=dp_mesh)
            self._sharded = True
        check_single_checkpointing(self.activation_checkpointing, getattr(attached_trainer(self), "strategy", None))
        predicting = getattr(attached_trainer(self), "predicting", False)  # generation: varying shapes, KV cache
        if self.compile_model and not self._compiled and not predicting:
            self.model.compile()
            self._compiled = True

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_str()
        # After the callbacks' hooks (Lightning's order): the EMA callback has put the averaged weights there.
        fold_temperature(checkpoint, self.network_temperature if self.calibrate_temperature else None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = attached_trainer(self)
        if trainer is not None and trainer.state.fn == "fit":  # a resumed fit: the trained weights, not the folded
            self.network_temperature = unfold_temperature(checkpoint)
        saved = checkpoint.get("tokenizer")
        if saved is not None and self.tokenizer is not None and saved != self.tokenizer.to_str():
            raise LMError("The checkpoint was trained with another tokenizer than the data module's: its token ids "
                          "would mean other strings. Let the data module load the checkpoint's tokenizer "
                          "(`lm` does this for --ckpt_path), or start a new run.")

    # ---------------------------------------------------------------------------------- training
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def on_fit_start(self) -> None:
        if isinstance(self.model, GPT):
            rank_zero_info(
                f"GPT: {self.model.num_parameters() / 1e6:.2f}M parameters "
                f"({self.model.num_parameters(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
                f"{self.config.num_hidden_layers} layers, hidden {self.config.hidden_size}, "
                f"{self.config.num_attention_heads} heads, vocab {self.config.vocab_size}"
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.training_loss(split_windows(batch, self.training_context))
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()).clamp(max=1e6), on_step=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Effective batch in tokens = batch_size * block_size * accumulate_grad_batches * world_size.
        trainer = self.trainer
        tokens_per_step = batch[1].numel() * trainer.accumulate_grad_batches * trainer.world_size
        self.log("train/tokens_per_step", float(tokens_per_step), on_step=True, on_epoch=False)
        # From the (checkpointed) step counter, so it survives a resume; exact while the batch shape is fixed.
        self.log("train/tokens_seen", float(trainer.global_step * tokens_per_step), on_step=True, on_epoch=False)

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The objective of a training batch: `compute_loss` of the logits, or with `loss_chunk_size` the same
        mean cross-entropy, chunk by chunk; `copy_distillation` and `multi_token_prediction` add their terms."""
        input_ids, targets = batch
        copy_weight = self._copy_distillation_weight()
        if not len(self.future_heads) and not copy_weight:
            if self.loss_chunk_size is None:
                return self.compute_loss(self(input_ids), targets)
            nll, num_tokens = self.summed_nll(input_ids, targets)
            return nll / num_tokens.clamp(min=1)
        hidden = self.model(input_ids, return_hidden=True)
        logits = self.model.head(hidden)
        if copy_weight:
            loss = copy_distillation_loss(logits, hidden, targets, self._copy_sharpness(), copy_weight)
        else:
            loss = self.compute_loss(logits, targets)
        if len(self.future_heads):
            future = sum(self.compute_loss(self.model.head(head(hidden[:, :-k])), targets[:, k:])
                         for k, head in enumerate(self.future_heads, start=1)) / len(self.future_heads)
            self.log("train/future_loss", future.detach(), on_step=True)
            loss = loss + self.hparams.multi_token_weight * future
        return loss

    def _copy_distillation_weight(self) -> float:
        """Copy distillation's share of this step's objective: `copy_distillation`, decayed by the run's progress
        with `copy_distillation_until`."""
        if not self.copy_distillation or self.copy_distillation_until is None:
            return self.copy_distillation
        progress = max(self.schedule_progress(self.global_step), 0.0)  # below 0 in a step-bounded warm-up
        weight = self.copy_distillation * max(0.0, 1.0 - progress / self.copy_distillation_until)
        self.log("train/copy_distillation", weight, on_step=True, on_epoch=False)
        return weight

    def _copy_sharpness(self) -> float:
        """The copy attention's sharpness: the context cache's calibrated one, or its starting value without a cache."""
        cache = getattr(self.model, "context_cache", None)
        return float(cache.sharpness) if cache is not None else ContextCache.SHARPNESS_BEFORE_CALIBRATION

    def summed_nll(self, input_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Summed NLL of `targets` and their number (`lm.evaluation.token_losses.token_nll`), by chunks of
        `loss_chunk_size` tokens when it is set."""
        if self.loss_chunk_size is None:
            return token_nll(self(input_ids), targets)
        hidden = self.model(input_ids, return_hidden=True)
        return chunked_token_nll(self.model.head, hidden, targets, self.loss_chunk_size)

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: LanguageModelingMetrics) -> Tensor:
        input_ids, targets = batch
        num_bytes = self.token_bytes[targets.clamp(min=0)][targets != IGNORE_INDEX].sum()
        if self.temperature_metrics is not None and metrics is self.val_metrics:
            # The NLL at every temperature from one read of the logits; the network's own is the one at T = 1.
            by_temperature = sum(summed_nll_by_temperature(logits, chunk_targets, IGNORE_INDEX)
                                 for logits, chunk_targets in self._logit_chunks(input_ids, targets))
            num_tokens = (targets != IGNORE_INDEX).sum()
            self.temperature_metrics.update(by_temperature, num_tokens, num_bytes)
            nll = by_temperature[TEMPERATURES.index(1.0)].float()
        else:
            nll, num_tokens = self.summed_nll(input_ids, targets)  # never the (overridable) objective
        metrics.update(nll, num_tokens, num_bytes)
        return nll / num_tokens.clamp(min=1)

    def _logit_chunks(self, input_ids: Tensor, targets: Tensor):
        """(logits, targets) of a batch: whole, or with `loss_chunk_size` that many tokens at a time."""
        if self.loss_chunk_size is None:
            yield self(input_ids), targets
            return
        hidden = self.model(input_ids, return_hidden=True).flatten(0, 1)
        chunks = zip(hidden.split(self.loss_chunk_size), targets.flatten().split(self.loss_chunk_size))
        for chunk, chunk_targets in chunks:
            yield self.model.head(chunk.unsqueeze(0)), chunk_targets.unsqueeze(0)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.test_metrics)

    def _log_metrics(self, prefix: str, metrics: LanguageModelingMetrics) -> None:
        values = metrics.compute()  # synced (summed) across processes before dividing
        for name, value in values.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        if self.temperature_metrics is not None:
            calibrated = self.temperature_metrics.compute()  # summed across processes before the best is chosen
            self.temperature_metrics.reset()
            if self.trainer.sanity_checking:  # a few batches before training: not a calibration to keep
                return
            self.network_temperature = TEMPERATURES[int(calibrated.pop("index"))]
            self.log("val/temperature", self.network_temperature)
            for name in ("loss", "bpb"):
                if name in calibrated:
                    self.log(f"val/calibrated_{name}", calibrated[name])

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks this model needs whatever the recipe lists: a context cache's calibration."""
        return [ContextCacheCalibration()] if getattr(self.model, "accepts_context_cache", False) else []

    # -------------------------------------------------------------------------------- prediction
    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Complete a batch of prompt strings with `self.sampling`, the same sampler as `lm generate`."""
        if self.tokenizer is None:
            raise LMError("No tokenizer: run `lm predict` with --ckpt_path of a checkpoint written by `lm fit`.")
        prompts = list(batch)
        completions = generate_text(self.model, self.tokenizer, prompts, self.sampling.for_batch(batch_idx))
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]

    # ------------------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        hp = self.hparams
        if hp.get("optimizer") in MUON_OPTIMIZERS and self._sharded_run():
            raise LMError(f"optimizer: {hp.optimizer} (Muon) does not work with sharded training (FSDP/FSDP2) yet: "
                          "its checkpoints need a single optimizer state. Use --model.optimizer adamw, or DDP.")
        optimizer = self.new_optimizer()
        min_lr = hp.min_learning_rate if hp.min_learning_rate is not None else hp.learning_rate / 10
        warmup, progress = self._schedule_progress()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, progress(step), warmup, min_lr / hp.learning_rate, hp.schedule, hp.cooldown_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def new_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the hyper-parameters describe, over the network's parameters (no schedule): what
        `configure_optimizers` steps, and what `lm plan`'s memory probe builds to measure a step."""
        hp = self.hparams
        network = self.model if not len(self.future_heads) else _WithFutureHeads(self.model, self.future_heads)
        return build_optimizer(network, hp.learning_rate, hp.weight_decay, tuple(hp.betas),
                               fused=self.fused_adamw, optimizer=hp.get("optimizer", "adamw"),
                               adamw_lr_ratio=hp.get("adamw_lr_ratio", 1.0))

    def _sharded_run(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._sharded or isinstance(getattr(attached_trainer(self), "strategy", None), FSDPStrategy)

    def schedule_progress(self, step: int) -> float:
        """How far the run is through its budget at optimizer `step` (0 -> 1; below 0 during a step-bounded
        warm-up): the progress the LR schedule follows, for callbacks that schedule something else by it."""
        return self._schedule_progress()[1](step)

    def _schedule_progress(self):
        """(warm-up steps, step -> how far the run is through its budget (0 -> 1): by optimizer steps, by wall-clock when the
        Trainer has `max_time`, or whichever is further along when it has both."""
        from lightning.pytorch.callbacks import Timer

        hp, trainer = self.hparams, self.trainer
        max_steps = hp.max_steps or trainer.estimated_stepping_batches
        steps_bounded = math.isfinite(max_steps) and max_steps > 0
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)
        if not steps_bounded and timer is None:
            raise LMError("Cannot infer the schedule length: set trainer.max_steps, trainer.max_time or model.max_steps.")
        warmup = min(hp.warmup_steps, int(max_steps)) if steps_bounded else hp.warmup_steps

        def progress(step: int) -> float:
            by_steps = step_progress(step, warmup, int(max_steps)) if steps_bounded else 0.0
            if timer is None:
                return by_steps
            elapsed = timer.time_elapsed()
            return max(by_steps, elapsed / max(elapsed + (timer.time_remaining() or 0.0), 1e-9))

        return warmup, progress

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients
        itself (fused AdamW, our default) -- even under bf16-mixed, where there is no GradScaler and the
        gradients are the true ones. Without a scaler, clip them as in full precision; with one
        (16-mixed) keep Lightning's check (choose `fused_adamw: false` there)."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def chunked_token_nll(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor,
                      chunk_size: int) -> tuple[Tensor, Tensor]:
    """`token_nll(head(hidden), targets)` computed `chunk_size` tokens at a time: the same summed NLL and number
    of scored targets (masked ones, IGNORE_INDEX, count in neither), without the whole logits.

    `head` maps hidden states (..., hidden) to logits (..., vocab), soft-capping included (`GPT.head`). Each
    chunk's logits, their float32 log-softmax and its gradient exist one chunk at a time. When a gradient is
    wanted, each chunk runs under torch.utils.checkpoint: autograd keeps only the chunk's hidden states (a view
    of `hidden`, which the LM head keeps anyway) and recomputes its logits in the backward pass; without it,
    the saved log-softmax of every chunk would add up to the full logits again. Why not a library: Liger
    Kernel's fused linear cross-entropy is Triton (GPU only), and litgpt's `chunked_cross_entropy` chunks the
    loss of logits already computed in full. Gradients equal the unchunked path's (tests/test_memory_levers.py)."""
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    num_tokens = (targets != IGNORE_INDEX).sum()
    if flat_targets.numel() <= chunk_size:
        return token_nll(head(flat_hidden).unsqueeze(0), flat_targets.unsqueeze(0))[0], num_tokens
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    nll = None
    for start in range(0, flat_targets.numel(), chunk_size):
        chunk = (head, flat_hidden[start:start + chunk_size], flat_targets[start:start + chunk_size])
        # preserve_rng_state=False: the head draws no random numbers, so there is no RNG state to restore.
        part = (checkpoint(_chunk_nll, *chunk, use_reentrant=False, preserve_rng_state=False) if recompute
                else _chunk_nll(*chunk))
        nll = part if nll is None else nll + part
    return nll, num_tokens


def _chunk_nll(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL of one chunk: hidden (n, hidden), targets (n,)."""
    return token_nll(head(hidden).unsqueeze(0), targets.unsqueeze(0))[0]


def check_single_checkpointing(activation_checkpointing: bool, strategy: Any) -> None:
    """Refuse `model.activation_checkpointing` beside FSDPStrategy's `activation_checkpointing_policy`: both
    recompute every block, and nested they would recompute each block twice per backward (two extra forwards)
    for no memory saved."""
    if activation_checkpointing and getattr(strategy, "_activation_checkpointing_kwargs", None):
        raise LMError("Activation checkpointing is set twice: --model.activation_checkpointing true and the FSDP "
                      "strategy's activation_checkpointing_policy (experiments/trainer/fsdp.yaml) both recompute "
                      "every block. Keep one: drop --model.activation_checkpointing under FSDPStrategy.")


def attached_trainer(module: L.LightningModule) -> Optional[L.Trainer]:
    """The module's Trainer, or None when it runs without one (Lightning's `module.trainer` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


class FutureTokenHead(nn.Module):
    """Multi-token prediction's extra head: the final hidden state h plus W norm(h) (W starts at zero, so the head
    starts as the next-token prediction), read by the network's own LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.proj(self.norm(hidden))


class _WithFutureHeads(nn.Module):
    """The network and the future-token heads as one module for `build_optimizer` (the LM head stays the head)."""

    def __init__(self, model: nn.Module, future_heads: nn.ModuleList) -> None:
        super().__init__()
        self.model, self.future_heads = model, future_heads
        self.lm_head = getattr(model, "lm_head", None)  # build_optimizer keeps the head out of Muon


def _check_optimizer_settings(learning_rate: float, min_learning_rate: Optional[float], weight_decay: float,
                              warmup_steps: int, cooldown_fraction: float, optimizer: str = "adamw",
                              adamw_lr_ratio: float = 1.0) -> None:
    """Refuse impossible optimizer settings when the run is configured (AdamW would raise deep in Lightning)."""
    if not learning_rate > 0:
        raise LMError(f"model.learning_rate must be positive, got {learning_rate}: e.g. --model.learning_rate 1e-3.")
    if min_learning_rate is not None and not 0 <= min_learning_rate <= learning_rate:
        raise LMError(f"model.min_learning_rate must be in [0, learning_rate={learning_rate}], got {min_learning_rate}.")
    if weight_decay < 0:
        raise LMError(f"model.weight_decay must be >= 0, got {weight_decay}: e.g. --model.weight_decay 0.1.")
    if warmup_steps < 0:
        raise LMError(f"model.warmup_steps must be >= 0, got {warmup_steps}.")
    if not 0 < cooldown_fraction <= 1:
        raise LMError(f"model.cooldown_fraction must be in (0, 1], got {cooldown_fraction}: the share of the run "
                      f"spent decaying the LR (1.0: a linear decay from the end of warm-up).")
    if not adamw_lr_ratio > 0:
        raise LMError(f"model.adamw_lr_ratio must be positive, got {adamw_lr_ratio}: e.g. --model.adamw_lr_ratio 1.0.")
    if adamw_lr_ratio != 1.0 and optimizer not in MUON_OPTIMIZERS:
        raise LMError(f"model.adamw_lr_ratio={adamw_lr_ratio} sets AdamW's learning rate beside Muon's, but "
                      f"model.optimizer is {optimizer!r}: every parameter is AdamW's there. Set "
                      f"model.learning_rate instead, or use a Muon optimizer (--model.optimizer muon).")
