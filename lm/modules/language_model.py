"""`LanguageModel`: the LightningModule for pre-training a GPT.

It wires four things and nothing else: the hand-written `GPT` (lm/model), the cross-entropy loss,
token-weighted loss / perplexity / bits-per-byte (lm/metrics.py) and AdamW with warm-up + cosine
decay (lm/optim.py). The tokenizer travels inside every checkpoint, so a `.ckpt` file alone is
enough to evaluate or generate.

Hooks meant for subclasses (select one with `--model my_pkg.MyModel` or `class_path` in YAML):
- `build_model(config)`: return your own `nn.Module` (e.g. a GPT with a custom attention);
- `compute_loss(logits, targets)`: change the objective (label smoothing, z-loss, ...);
- `configure_optimizers()`: another optimizer or schedule.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lm.metrics import LanguageModelingMetrics
from lm.model import GPT, GPTConfig
from lm.optim import build_optimizer, warmup_cosine

IGNORE_INDEX = -100


class LanguageModel(L.LightningModule):
    """Causal language modelling with a GPT.

    With `--ckpt_path`, the CLI restores every saved hyper-parameter except those in `RUN_TIME_ARGS`,
    which stay this run's (a subclass adds its own run-time options to the tuple).

    Args:
        config: The transformer's shape and variants (see `GPTConfig`). Its `vocab_size` is linked to
            `data.vocab_size` by the CLI.
        learning_rate: Peak learning rate reached after warm-up.
        min_learning_rate: Floor of the cosine decay; default `learning_rate / 10`.
        weight_decay: AdamW decoupled weight decay for linear weights (norms, biases and embeddings get none).
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear warm-up.
        max_steps: Steps over which the cosine decays; default: the Trainer's total optimizer steps.
        fused_adamw: Use the fused AdamW kernel (default: where the device has one).
        compile: Wrap the transformer in `torch.compile` (slow first step, faster after; GPU mostly).
        max_new_tokens: `lm predict`: tokens to generate per prompt.
        temperature: `lm predict`: sampling temperature (0 = greedy).
        top_k: `lm predict`: sample only among the k most likely tokens.
        top_p: `lm predict`: nucleus sampling threshold.
        generation_seed: `lm predict`: seed of the sampler, for reproducible generations (batch i
            uses generation_seed + i).
        stop: `lm predict`: strings that end a completion.
        truncate: `lm predict`: left-truncate prompts too long for the context instead of failing.
    """

    RUN_TIME_ARGS: tuple[str, ...] = ("compile", "fused_adamw", "max_new_tokens", "temperature", "top_k", "top_p",
                                       "generation_seed", "stop", "truncate")

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        learning_rate: float = 1e-3,
        min_learning_rate: Optional[float] = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: Optional[int] = None,
        fused_adamw: Optional[bool] = None,
        compile: bool = False,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: Optional[int] = 50,
        top_p: Optional[float] = None,
        generation_seed: int = 1234,
        stop: Optional[list[str]] = None,
        truncate: bool = False,
    ) -> None:
        super().__init__()
        # A dict when reloaded from a checkpoint's plain hyper-parameters; copied either way so the
        # shared default instance is never mutated.
        self.config = GPTConfig.from_dict(config if isinstance(config, dict) else config.to_dict())
        # Checkpoints are read with torch.load(weights_only=True): keep hyper-parameters plain types.
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = self.config.to_dict()
        self.model = self.build_model(self.config)
        self.tokenizer = None  # set from the DataModule in setup(), or from a checkpoint
        self.register_buffer("token_bytes", torch.zeros(self.config.vocab_size, dtype=torch.long), persistent=False)
        self.val_metrics = LanguageModelingMetrics()
        self.test_metrics = LanguageModelingMetrics()
        self._compiled = False
        self._sharded = False
        self._rng_states_to_restore: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------------------ subclass hooks
    def build_model(self, config: GPTConfig) -> nn.Module:
        """The network: any module mapping ids (B, T) to logits (B, T, vocab)."""
        return GPT(config)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Summed token negative log-likelihood (nats) and the number of target tokens.

        Logits are upcast to float32 for the log-softmax: under bf16 autocast a 8k-50k way softmax
        in bf16 loses the small probabilities the loss is made of."""
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return nll, (targets != IGNORE_INDEX).sum()

    # --------------------------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer) -> None:
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}: set --data.vocab_size (linked to the model) to at least {tokenizer.vocab_size}."
            )
        self.tokenizer = tokenizer
        lengths = torch.zeros(self.config.vocab_size, dtype=torch.long)
        lengths[: tokenizer.vocab_size] = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
        self.token_bytes = lengths.to(self.token_bytes.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.tokenizer is None and getattr(datamodule, "tokenizer", None) is not None:
            self.set_tokenizer(datamodule.tokenizer)

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
                raise ValueError("LanguageModel shards with FSDP2 only: use ModelParallelStrategy(tensor_parallel_size=1).")
            dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            for block in [m for m in self.model.modules() if isinstance(m, Block)]:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(self.model, mesh=dp_mesh)
            self._sharded = True
        predicting = self._trainer is not None and self.trainer.predicting  # generation: varying shapes, KV cache
        if self.hparams.compile and not self._compiled and not predicting:
            self.model.compile()
            self._compiled = True

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_str()
        # Lightning does not checkpoint random generators; dropout needs them for an exact resume.
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer" in checkpoint:
            from lm.data.tokenizer import Tokenizer

            self.set_tokenizer(Tokenizer.from_str(checkpoint["tokenizer"]))
        # A checkpoint written from a compiled model has "_orig_mod." in its keys; accept it either way.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if "._orig_mod." in k]:
            state[key.replace("._orig_mod.", ".")] = state.pop(key)
        # Applied when training resumes (on_train_start), after everything that runs between loading
        # and the first batch (sanity validation, ...), not now.
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if states:
            _set_rng_states(states)

    # ---------------------------------------------------------------------------------- training
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def on_fit_start(self) -> None:
        raw = getattr(self.model, "_orig_mod", self.model)
        if isinstance(raw, GPT):
            rank_zero_info(
                f"GPT: {raw.num_parameters() / 1e6:.2f}M parameters "
                f"({raw.num_parameters(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
                f"{self.config.num_hidden_layers} layers, hidden {self.config.hidden_size}, "
                f"{self.config.num_attention_heads} heads, vocab {self.config.vocab_size}"
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, targets = batch
        nll, num_tokens = self.compute_loss(self(input_ids), targets)
        loss = nll / num_tokens.clamp(min=1)
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

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: LanguageModelingMetrics) -> Tensor:
        input_ids, targets = batch
        nll, num_tokens = self.compute_loss(self(input_ids), targets)
        valid = targets != IGNORE_INDEX
        num_bytes = self.token_bytes[targets.clamp(min=0)][valid].sum()
        metrics.update(nll, num_tokens, num_bytes)
        return nll / num_tokens.clamp(min=1)

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

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    # -------------------------------------------------------------------------------- prediction
    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Complete a batch of prompt strings with the same sampler as `lm generate`."""
        from lm.model.generate import SamplingOptions, generate_text

        if self.tokenizer is None:
            raise RuntimeError("No tokenizer: run `lm predict` with --ckpt_path of a checkpoint written by `lm fit`.")
        hp = self.hparams
        options = SamplingOptions(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_k=hp.top_k,
                                  top_p=hp.top_p, seed=hp.generation_seed, stop=hp.get("stop"),
                                  truncate=hp.get("truncate", False))
        prompts = list(batch)
        completions = generate_text(getattr(self.model, "_orig_mod", self.model), self.tokenizer, prompts,
                                    **options.kwargs(seed_offset=batch_idx))
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]

    # ------------------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.model, hp.learning_rate, hp.weight_decay, tuple(hp.betas),
                                    fused=hp.fused_adamw)
        max_steps = hp.max_steps or int(self.trainer.estimated_stepping_batches)
        if not math.isfinite(max_steps) or max_steps <= 0:
            raise ValueError("Cannot infer the schedule length: set trainer.max_steps or model.max_steps.")
        min_lr = hp.min_learning_rate if hp.min_learning_rate is not None else hp.learning_rate / 10
        warmup = min(hp.warmup_steps, max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, max_steps, min_lr / hp.learning_rate)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


def _rng_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) generator states, as types `torch.load(weights_only=True)` reads.

    In a multi-process run the checkpoint holds rank 0's states; every rank restores them, which is exact
    because Lightning seeds all ranks alike (`seed_everything`), so their generators advance in lock step."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
