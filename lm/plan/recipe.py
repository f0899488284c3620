"""A recipe as `lm plan` sees it: the model's shape (built on the meta device) and the training setup.

- `read_recipe(args)`: parse `--config a.yaml --config b.yaml --trainer.x y ...` with `lm fit`'s own
  LightningCLI parser (`lm.cli.lightning_cli.parse_recipe`: same merging, links and defaults, nothing
  instantiated), then build the LightningModule on the meta device (no memory, no weights) and read
  the network's own counts: `num_parameters`, `flops_per_token` (the formula the throughput callback
  uses), and the size of the largest FSDP unit (a transformer `Block`, or the root: embeddings,
  final norm, head).
- `Setup`: what the Trainer would do with it: precision, strategy (single, ddp, fsdp = Lightning's
  FSDPStrategy, fsdp2 = ModelParallelStrategy + `fully_shard`), world size, micro-batch,
  accumulation, activation checkpointing (FSDP's policy or the model's own,
  `--model.activation_checkpointing`), the chunked LM head and loss (`--model.loss_chunk_size`).
  Frozen, so a suggestion is `dataclasses.replace(setup, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lm.cli.lightning_cli import parse_recipe
from lm.errors import LMError
from lm.io.class_paths import import_class
from lm.model.layers import Block
from lm.modules.optimizers import MUON_OPTIMIZERS, newton_schulz_flops

STRATEGIES = ("single", "ddp", "fsdp", "fsdp2")
SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP")  # FSDP1's ZeRO-3 and ZeRO-2; fsdp2 is always FULL_SHARD
PRECISION_ALIASES = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
                     "bf16-true": "bf16-true", "16": "16-mixed", "16-mixed": "16-mixed", "16-true": "16-true"}


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from the network built on the meta device."""

    parameters: int                 # unique (a tied head counted once)
    non_embedding_parameters: int
    flops_per_token: int            # training (forward + backward) at `sequence_length`
    sequence_length: int            # tokens per training window: the model's context
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    kv_size: int                    # key/value heads x head size (= hidden for multi-head attention)
    intermediate_size: int
    activation: str                 # gelu | swiglu
    attention: str                  # sdpa (fused: no T x T scores kept) | math
    position: str
    qk_norm: bool
    dropout: float
    largest_unit_parameters: int    # the biggest FSDP unit: a Block or the root (embeddings, norm, head)
    optimizer_states: float = 2.0   # per parameter: AdamW keeps exp_avg and exp_avg_sq; Muon one momentum
    optimizer_flops: float = 0.0    # per optimizer step and device: Muon's Newton-Schulz iterations (AdamW ~0)
    num_units: int = 1              # FSDP units: the blocks and the root (embeddings, final norm, head)
    attention_dropout: Optional[float] = None  # None: `dropout`
    residual_scalars: bool = False  # each block keeps its unmixed input for the scalars' gradients
    value_embedding_rows: int = 0   # (B, T, kv_size) value-embedding tensors kept for backward: one per table,
                                    # one more per layer that sums two tables (GPTConfig.value_embeddings)
    value_embedding_layers: int = 0  # layers that add value-embedding rows to their values
    smear_gate_channels: int = 0    # smear (0: off) keeps the shifted embeddings (B, T, hidden), the gate's input
                                    # channels and a few (B, T, 1) gate values for the backward pass
    bigram_embedding: bool = False  # keeps the hashed row ids (B, T) int64 for the table's gradient
    norm: str = "layernorm"         # layernorm | rmsnorm: what a norm keeps for backward differs (estimate.py)
    block_parameters: int = 0       # all blocks' parameters: under activation checkpointing autocast's casts of
                                    # them are not kept for the backward pass (one block's are, while recomputed)


@dataclass(frozen=True)
class Setup:
    """How the recipe trains: the knobs a plan varies."""

    precision: str
    strategy: str
    devices: int                    # per node
    nodes: int
    micro_batch: int                # data.batch_size: sequences per device per forward
    accumulation: int
    activation_checkpointing: bool = False
    sharding: str = "FULL_SHARD"
    accelerator: str = "gpu"        # cpu: its attention and dropout kernels keep more (see estimate.py)
    weight_average: bool = False    # an EMA/SWA callback keeps an fp32 copy of the weights (lm.callbacks.ema)
    checkpointing_in_model: bool = False  # the checkpointing is the model's (--model.activation_checkpointing),
                                          # not FSDP's policy: a probe of the module alone runs it too
    loss_chunk_size: Optional[int] = None  # --model.loss_chunk_size: logits exist this many tokens at a time

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes


@dataclass(frozen=True)
class Recipe:
    model: ModelShape
    setup: Setup
    max_steps: Optional[int]
    experiment: str


def read_recipe(args: list[str], devices: Optional[int] = None, nodes: Optional[int] = None,
                default_precision: str = "bf16-mixed") -> Recipe:
    """The recipe given by `lm fit`-style arguments; `devices`/`nodes` override the Trainer's."""
    config = parse_recipe(args)
    trainer, data = config.trainer, config.get("data")
    context = _get(data, "block_size")  # the model's context: the parser links data.block_size to it
    model = model_shape(config.model, int(context))
    devices = devices if devices is not None else _device_count(trainer.devices)
    nodes = nodes if nodes is not None else int(trainer.num_nodes or 1)
    if devices < 1 or nodes < 1:
        raise LMError(f"devices and nodes must be at least 1, got devices={devices}, nodes={nodes}.")
    strategy, sharding, checkpointing = _strategy(trainer.strategy, devices * nodes)
    levers = _model_levers(config.model)
    if checkpointing and levers["activation_checkpointing"]:
        raise LMError("Activation checkpointing is set twice: model.activation_checkpointing and the FSDP strategy's "
                      "activation_checkpointing_policy both recompute every block (lm fit refuses it). Keep one.")
    precision = _precision(trainer.precision, default_precision)
    micro_batch = _get(data, "batch_size")
    if not micro_batch:
        raise LMError("The recipe has no data.batch_size: lm plan needs the micro-batch (sequences per device).")
    setup = Setup(precision=precision, strategy=strategy, devices=devices, nodes=nodes, micro_batch=int(micro_batch),
                  accumulation=int(trainer.accumulate_grad_batches or 1),
                  activation_checkpointing=checkpointing or levers["activation_checkpointing"],
                  checkpointing_in_model=levers["activation_checkpointing"], loss_chunk_size=levers["loss_chunk_size"],
                  sharding=sharding, weight_average=_averages_weights(trainer.get("callbacks")))
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    return Recipe(model=model, setup=setup, max_steps=max_steps, experiment=str(config.get("experiment") or ""))


def model_shape(model_config: Any, sequence_length: int) -> ModelShape:
    """Build the LightningModule of `model_config` (class_path + init_args) on the meta device and measure it."""
    init_args = model_config.init_args.as_dict()
    with torch.device("meta"):  # shapes only: no memory is allocated, no weights initialized
        module = import_class(model_config.class_path)(**init_args)
    net = getattr(module, "model", module)
    if len(getattr(module, "future_heads", ())):
        raise LMError(f"lm plan does not estimate multi-token prediction's extra heads (model.multi_token_prediction="
                      f"{len(module.future_heads)}: one more LM head's logits and its backward per head, each step). "
                      f"Plan the recipe without them (--model.multi_token_prediction 0) and allow for that much more.")
    if getattr(module, "copy_distillation", 0):
        raise LMError(f"lm plan does not estimate copy distillation's soft targets (model.copy_distillation="
                      f"{module.copy_distillation}: micro-batch x context^2 (id, weight) pairs beside the logits, ~24 "
                      f"bytes each, while the loss is made). Plan the recipe without it (--model.copy_distillation 0) "
                      f"and allow for that much more.")
    if not (hasattr(net, "num_parameters") and hasattr(net, "flops_per_token")):
        raise LMError(f"{model_config.class_path} builds a {type(net).__name__}: lm plan needs a network with "
                         f"num_parameters() and flops_per_token() (as lm.model.GPT has).")
    c = net.config
    block_parameter_counts = [sum(p.numel() for p in m.parameters()) for m in net.modules() if isinstance(m, Block)]
    in_blocks = {id(p) for m in net.modules() if isinstance(m, Block) for p in m.parameters()}
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_blocks)
    states, optimizer_flops = 2.0, 0.0
    if init_args.get("optimizer") in MUON_OPTIMIZERS:  # Muon's hidden matrices keep one buffer (NorMuon one more
        # value per row: not counted), the rest AdamW's two
        hidden = [m.weight for b in net.modules() if isinstance(b, Block)
                  for m in b.modules() if isinstance(m, torch.nn.Linear)]
        muon = sum(w.numel() for w in hidden)
        states = (2.0 * (net.num_parameters() - muon) + muon) / net.num_parameters()
        optimizer_flops = float(sum(newton_schulz_flops(tuple(w.shape)) for w in hidden))
    return ModelShape(
        parameters=net.num_parameters(), non_embedding_parameters=net.num_parameters(exclude_embeddings=True),
        flops_per_token=int(net.flops_per_token(sequence_length)), sequence_length=sequence_length,
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, kv_size=c.num_key_value_heads * c.head_dim,
        intermediate_size=c.intermediate_size, activation=c.activation, attention=c.attention, position=c.position,
        qk_norm=c.qk_norm, dropout=c.dropout, attention_dropout=c.attention_dropout, largest_unit_parameters=max(block_parameter_counts + [root]),
        optimizer_states=states, optimizer_flops=optimizer_flops, num_units=len(block_parameter_counts) + 1,
        residual_scalars=c.residual_scalars, value_embedding_rows=value_embedding_rows(c),
        value_embedding_layers=sum(bool(c.value_embedding_tables(i)) for i in range(c.num_hidden_layers)),
        smear_gate_channels=net.smear_gate.shape[1] if getattr(c, "smear", False) else 0,
        bigram_embedding=bool(getattr(c, "bigram_embedding", 0)),
        norm=c.norm, block_parameters=sum(block_parameter_counts),
    )


def value_embedding_rows(config: Any) -> int:
    """How many (B, T, kv_size) value-embedding tensors a training forward keeps for the backward pass: each table's
    lookup (every layer it serves scales the same tensor), plus the sum of a layer served by two tables."""
    n = getattr(config, "value_embeddings", 0)
    if not n:
        return 0
    return n + sum(len(config.value_embedding_tables(i)) > 1 for i in range(config.num_hidden_layers))


def _model_levers(model_config: Any) -> dict[str, Any]:
    """The LightningModule's memory levers (`LanguageModel`'s `activation_checkpointing`, `loss_chunk_size`); a
    model class without them has them off."""
    init_args = _get(model_config, "init_args")
    chunk = _get(init_args, "loss_chunk_size")
    return {"activation_checkpointing": bool(_get(init_args, "activation_checkpointing")),
            "loss_chunk_size": int(chunk) if chunk is not None else None}


def _averages_weights(callbacks: Any) -> bool:
    """Whether a callback keeps a moving average of the weights (ExponentialMovingAverage, Lightning's
    WeightAveraging family): one more full-precision copy of the model in memory."""
    names = [str(_get(c, "class_path") if hasattr(c, "get") else type(c).__name__) for c in (callbacks or [])]
    return any(n.endswith(("ExponentialMovingAverage", "WeightAveraging", "StochasticWeightAveraging")) for n in names)


def _get(namespace: Any, key: str) -> Any:
    return None if namespace is None else namespace.get(key)


def _device_count(devices: Any) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    raise LMError(f"The recipe has trainer.devices={devices!r}: pass --devices N (devices per node) to plan it.")


def _precision(precision: Any, default: str) -> str:
    if precision is None:
        return default
    name = PRECISION_ALIASES.get(str(precision))
    if name is None:
        raise LMError(f"lm plan does not model precision {precision!r}; it knows {sorted(set(PRECISION_ALIASES.values()))}.")
    return name


def _strategy(strategy: Any, world_size: int) -> tuple[str, str, bool]:
    """(strategy, FSDP sharding, activation checkpointing) of a Trainer's `strategy` value."""
    class_path = strategy if isinstance(strategy, str) else _get(strategy, "class_path") or ""
    init_args = _get(strategy, "init_args") if not isinstance(strategy, str) else None
    name = class_path.rsplit(".", 1)[-1].lower()
    if name in ("auto", "", "none"):
        return ("ddp" if world_size > 1 else "single"), "FULL_SHARD", False
    if name in ("single_device", "singledevicestrategy"):
        return "single", "FULL_SHARD", False
    if name.startswith("ddp"):
        return "ddp", "FULL_SHARD", False
    if name in ("fsdp", "fsdpstrategy"):
        sharding = str(getattr(_get(init_args, "sharding_strategy"), "name", None)
                       or _get(init_args, "sharding_strategy") or "FULL_SHARD").upper()
        if sharding not in SHARDINGS:
            raise LMError(f"lm plan models FSDP sharding_strategy {' or '.join(SHARDINGS)}, not {sharding}.")
        checkpointing = bool(_get(init_args, "activation_checkpointing_policy") or _get(init_args, "activation_checkpointing"))
        return "fsdp", sharding, checkpointing
    if name == "modelparallelstrategy":
        return "fsdp2", "FULL_SHARD", False
    raise LMError(f"lm plan does not model strategy {class_path!r}: use auto, ddp, fsdp (FSDPStrategy) or "
                     f"ModelParallelStrategy (FSDP2, experiments/trainer/fsdp2_cpu.yaml).")
