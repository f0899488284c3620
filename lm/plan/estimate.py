"""Memory per device, communication per step and speed of a `Setup` of a `ModelShape`: plain arithmetic.

Memory (bytes per device), each item of `memory_per_device`:
- weights, gradients, optimizer state (AdamW: 2 values per parameter), in the precision's dtypes
  (`PRECISIONS`), divided by the world size where the strategy shards them: fsdp (FULL_SHARD) and
  fsdp2 shard all three, fsdp SHARD_GRAD_OP (ZeRO-2) gradients and optimizer state, ddp nothing;
- ddp gradient buckets: DDP all-reduces flat copies of the gradients (one more gradient's worth);
- fsdp gathered units: the all-gathered parameters of the unit being run and the one prefetched,
  and one unit's unsharded gradients before the reduce-scatter;
- bf16 weight copies: autocast's cast of every weight, alive from forward to backward (mixed
  precision without FSDP1, whose MixedPrecision gathers bf16 weights instead); under activation
  checkpointing only the casts outside the blocks (the head's): a checkpointed block saves nothing, and
  autocast's cache of casts is emptied when the forward's autocast region ends, before the backward;
- activations of one micro-batch (`activation_bytes_per_token`), with or without activation
  checkpointing (FSDP's policy or `--model.activation_checkpointing`: then only each block's input is kept);
- temporary logits: the (micro-batch x T x vocab) fp32 log-softmax and the two gradients of its backward
  pass; with `--model.loss_chunk_size` the same for one chunk of tokens, plus the chunk's head-weight
  gradient before it is added to the others (`temporary_logits_bytes`);
- recomputed block (checkpointing only): one block's activations (and its weights' casts), rebuilt during
  the backward pass after the logits are gone, so only what exceeds the temporary logits adds to the peak.
Their sum is a conservative peak: gradients are counted as alive during the forward (they are once
accumulation is on or the optimizer keeps them). Checked against real steps on CPU: the activations and
the tensors autograd saves (tests/test_plan.py), the levers' drop in a step's measured peak
(tests/test_memory_levers.py, benchmarks/memory_levers.py, docs/results/memory-levers.md).

Speed: (model FLOPs per token (`GPT.flops_per_token`: 6 x matmul parameters + attention) x tokens +
the optimizer's FLOPs (Muon's Newton-Schulz iterations, run whole on every rank)) / (MFU x peak FLOP/s);
activation checkpointing adds one forward (x 4/3), the chunked loss one forward of the LM head. Communication per device and optimizer step (ring
collectives move (N-1)/N of the data per device): DDP all-reduce 2 x gradient bytes in 25 MiB buckets;
FSDP all-gather of each unit's weights in forward and again in backward plus a reduce-scatter of its
gradients, per micro-batch (ZeRO-2 gathers once). Its time is bytes / bandwidth plus a fixed latency per
collective. On GPUs compute and communication overlap (DDP's bucketed all-reduce during backward, FSDP's
prefetch): a step takes the longer of the two. On CPUs (gloo) the collectives run on the cores that
compute, so a step takes their sum (`DeviceSpec.overlaps_communication`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from lm.model.layers import written_out_attention_is_faster
from lm.plan.devices import DeviceSpec
from lm.plan.recipe import ModelShape, Setup

RECOMPUTE_FACTOR = 4.0 / 3.0  # activation checkpointing: forward (2N) is run twice per 6N
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb: gradients are all-reduced in buckets of it


@dataclass(frozen=True)
class Precision:
    """Bytes per value of each kind of tensor, and the dtype whose peak FLOP/s applies."""

    weights: int
    grads: int
    optimizer: int
    compute: int        # matmul inputs/outputs (activations)
    residual: int       # the residual stream (autocast keeps it in fp32)
    compute_dtype: str
    cast_copy: int      # autocast's low-precision copy of each weight (mixed precision)


PRECISIONS = {
    "32-true": Precision(4, 4, 4, 4, 4, "float32", 0),
    "bf16-mixed": Precision(4, 4, 4, 2, 4, "bfloat16", 2),
    "16-mixed": Precision(4, 4, 4, 2, 4, "float16", 2),
    "bf16-true": Precision(2, 2, 2, 2, 2, "bfloat16", 0),
    "16-true": Precision(2, 2, 2, 2, 2, "float16", 0),
}


def activation_bytes_per_token(m: ModelShape, p: Precision, checkpointing: bool = False, cpu: bool = False,
                               micro_batch: int = 1) -> float:
    """Bytes autograd keeps per token of a micro-batch until the backward pass, for this model's layers.

    Per block: the two norms' inputs (residual stream) and statistics, the inputs of the four linear layers,
    the q,k,v projection's output (attention keeps v, a view of it), attention's q and k where RoPE or the
    QK-norm made new ones, its output and fp32 log-sum-exp per head, the MLP's activation input(s), the
    QK-norm's own tensors (`_norm_bytes`), and 1-byte dropout masks; outside the blocks, the value-embedding
    rows the layers scale. RoPE keeps only its cos/sin tables (shared by the layers). `sdpa` is counted as a
    fused kernel that keeps no T x T scores; `math` keeps the scores (fp32 softmax, its cast, a dropout mask).
    On CPU (`cpu`), sdpa with dropout runs the math kernel, so does sdpa in bf16 while a layer's scores (`micro_batch`
    x heads x T^2) are few (`lm.model.layers.written_out_attention_is_faster`), and dropout keeps its mask in its input's dtype,
    not as bytes (the residual branches' in the compute dtype, the embeddings' in the weights'). With
    checkpointing a block keeps only its input (and the value-embedding rows, inputs of the blocks); the one
    block being recomputed is `recomputed_block_bytes_per_token`. Checked per variant against the tensors
    autograd saves on CPU in 32-true and under bf16 autocast (tests/test_plan.py).
    """
    h, kv, i, c, r = m.hidden_size, m.kv_size, m.intermediate_size, p.compute, p.residual
    mask = (c if cpu else 1) if m.dropout > 0 else 0             # bytes per dropped value of a residual branch
    embedding_mask = (r if cpu else 1) if m.dropout > 0 else 0   # ... of the embeddings (the weights' dtype)
    attention_dropout = m.dropout if m.attention_dropout is None else m.attention_dropout
    written_out = m.attention == "sdpa" and written_out_attention_is_faster(  # lm's math_attention, not torch's
        "cpu" if cpu else "cuda", torch.bfloat16 if p.compute_dtype == "bfloat16" else None,
        micro_batch * m.num_heads * m.sequence_length ** 2, needs_grad=True)
    math_attention = m.attention == "math" or written_out or (cpu and attention_dropout > 0)
    rms = m.norm == "rmsnorm"
    block_norm = _norm_bytes(h, r, p.weights, rms, cpu)          # attn_norm, mlp_norm: input (residual stream), own
    block = 2 * block_norm
    block += (3 * h + i) * c                                     # qkv, o_proj, up, down inputs
    # CPU's sdpa with dropout runs its math kernel, which computes a bf16 q, k, v in fp32: fp32 copies are kept.
    upcast = cpu and m.attention == "sdpa" and not written_out and attention_dropout > 0 and c != 4
    attention_bytes = 4 if upcast else c
    new_q_k = m.position == "rope" or m.qk_norm                  # else q, k are views of the projection's output
    if math_attention and new_q_k and not upcast:  # the products keep the new q, k (below) and a copy of v
        block += kv * attention_bytes
    else:
        block += (h + 2 * kv) * attention_bytes                  # the q,k,v projection's output (or its fp32 copy)
    if math_attention and not upcast:  # grouped-query: math_attention's copies of k, v for every query head
        block += 2 * (h - kv) * attention_bytes
    if not math_attention:  # a fused kernel keeps its output and fp32 log-sum-exp. On CPU the output takes q's
        block += 4 * m.num_heads  # memory layout: (B, T, heads, d) for q a view of the projection's output, or
        block += h * c if not cpu or m.qk_norm else 0  # RoPE of it, is the o_proj input's memory (a view)
    block += (3 * i if m.activation == "swiglu" else i) * c      # GELU input / relu output / SiLU input, SiLU output, up
    if new_q_k:
        block += (h + kv) * c                                    # attention's q, k: new tensors, not views of q,k,v
    if m.qk_norm:  # RMSNorm per head of the projection's q, k (counted above, unless the norm keeps a copy)
        block += _norm_bytes(h + kv, c, p.weights, True, cpu, rows=m.num_heads + m.kv_size * m.num_heads // h)
        block -= 0 if _norm_copies_input(c, p.weights, True, cpu) else (h + kv) * c
    block += 2 * h * mask                                        # residual dropout masks
    if m.residual_scalars:
        block += h * r                                           # the unmixed input (scalar gradients)
    if math_attention:  # per score: fp32 softmax, then its cast to the compute dtype, or a dropout mask + output
        scores = m.num_heads * m.sequence_length          # (dropout's backward needs only its mask, not its input)
        score_mask = (attention_bytes if cpu else 1) if attention_dropout > 0 else 0
        cast = c if attention_bytes != 4 and attention_dropout == 0 else 0
        block += scores * (4 + cast + (score_mask + attention_bytes if attention_dropout > 0 else 0))
    outside = block_norm + h * c + h * embedding_mask            # final norm, head input, embedding dropout
    outside += m.value_embedding_rows * kv * p.residual          # value-embedding rows (the tables' dtype), kept
                                                                 # by each layer's scale * rows, checkpointed or not
    if m.smear_gate_channels:                                    # smear: shifted embeddings, gate input, 3 gate values
        outside += (h + m.smear_gate_channels + 3) * p.residual
    outside += 8 if m.bigram_embedding else 0                    # the bigram table's int64 row ids
    # A layer with value embeddings attends to v + scale * rows, a tensor of its own (a plain v is a view of the
    # q,k,v projection's output, already counted).
    value_embedding_layers = m.value_embedding_layers * kv * c
    if checkpointing:
        return m.num_layers * h * r + outside
    return m.num_layers * block + value_embedding_layers + outside


def _norm_bytes(size: int, input_bytes: int, weight_bytes: int, rms: bool, cpu: bool, rows: int = 1) -> float:
    """What a norm of `size` values per token (`rows` rows of them) keeps for the backward pass, its input included.

    LayerNorm (a fused kernel everywhere): its input and fp32 mean and 1/std per row. RMSNorm's fused kernel
    (CUDA, input and weight of one dtype): its input and fp32 1/rms per row. Its composite form (CPU always;
    CUDA when the dtypes differ, as for the QK-norm's bf16 q, k and fp32 weights under autocast) computes in
    fp32: it keeps the fp32 input (the input itself, or instead an fp32 copy of a bf16 one: `_norm_copies_input`),
    1/rms, and the fp32 normalized values the weight's gradient needs, then casts its output back."""
    if not rms:
        return size * input_bytes + 8 * rows
    if cpu or input_bytes != weight_bytes:
        return size * 4 + 4 * rows + size * 4
    return size * input_bytes + 4 * rows


def _norm_copies_input(input_bytes: int, weight_bytes: int, rms: bool, cpu: bool) -> bool:
    """Whether the norm keeps an fp32 copy of its input instead of the input itself (composite RMSNorm of bf16)."""
    return rms and (cpu or input_bytes != weight_bytes) and input_bytes != 4


def recomputed_block_bytes_per_token(m: ModelShape, p: Precision, cpu: bool = False, micro_batch: int = 1) -> float:
    """Under activation checkpointing, one block's activations, rebuilt in the backward pass."""
    one_layer = replace(m, num_layers=1, value_embedding_layers=min(1, m.value_embedding_layers))
    return (activation_bytes_per_token(one_layer, p, cpu=cpu, micro_batch=micro_batch)
            - activation_bytes_per_token(replace(one_layer, num_layers=0, value_embedding_layers=0), p, cpu=cpu,
                                         micro_batch=micro_batch))


def temporary_logits_bytes(m: ModelShape, s: Setup, p: Precision) -> float:
    """The logits' peak, in the backward pass of the loss, for every token (or one chunk of tokens). On CPU the
    logits (saved by the forward) and their gradient, both in the compute dtype (`lm.evaluation.token_losses.
    SummedCrossEntropy` computes the fp32 loss a block of rows at a time: its fp32 blocks are small); on an
    accelerator the fp32 log-softmax (saved by `F.cross_entropy`), the gradient reaching it and the one it passes
    back, 12 bytes a value whatever the precision. A chunk's backward also makes its own head-weight gradient
    (vocab x hidden) before adding it to the others'. Measured on CPU in 32-true and bf16-mixed
    (docs/results/memory-levers.md)."""
    tokens = s.micro_batch * m.sequence_length
    per_value = 2 * p.compute if s.accelerator == "cpu" else 12
    if s.loss_chunk_size is None or tokens <= s.loss_chunk_size:
        return tokens * m.vocab_size * per_value
    return s.loss_chunk_size * m.vocab_size * per_value + m.vocab_size * m.hidden_size * p.grads


def memory_per_device(m: ModelShape, s: Setup) -> dict[str, float]:
    """Itemized bytes per device (see the module docstring); zero items are left out."""
    p, P, W = PRECISIONS[s.precision], m.parameters, s.world_size
    shard_all = s.strategy == "fsdp2" or (s.strategy == "fsdp" and s.sharding == "FULL_SHARD")
    shard_states = s.strategy in ("fsdp", "fsdp2")
    tokens = s.micro_batch * m.sequence_length
    logits = temporary_logits_bytes(m, s, p)
    cast_copy = p.cast_copy if s.strategy != "fsdp" else 0
    recomputed = (tokens * recomputed_block_bytes_per_token(m, p, s.accelerator == "cpu", s.micro_batch)
                  + m.block_parameters / max(m.num_layers, 1) * cast_copy)
    checkpointed_parameters = m.block_parameters if s.activation_checkpointing else 0
    items = {
        "weights": P * p.weights / (W if shard_all else 1),
        "gradients": P * p.grads / (W if shard_states else 1),
        "optimizer state": P * m.optimizer_states * p.optimizer / (W if shard_states else 1),
        "averaged weights": P * 4.0 if s.weight_average else 0.0,  # the EMA's fp32 copy, never sharded
        "ddp gradient buckets": P * p.grads if s.strategy == "ddp" and W > 1 else 0.0,
        "fsdp gathered units": _gathered_unit_bytes(m, s, p) if shard_states and W > 1 else 0.0,
        "bf16 weight copies": (P - checkpointed_parameters) * cast_copy,
        "activations": tokens * activation_bytes_per_token(m, p, s.activation_checkpointing, s.accelerator == "cpu",
                                                           s.micro_batch),
        "temporary logits": logits,
        "recomputed block": max(0.0, recomputed - logits) if s.activation_checkpointing else 0.0,
    }
    return {name: value for name, value in items.items() if value}


def _gathered_unit_bytes(m: ModelShape, s: Setup, p: Precision) -> float:
    """Unsharded parameters (the running unit + the prefetched one) and one unit's full gradients."""
    gather, reduce = _collective_dtypes(s, p)
    unit = m.largest_unit_parameters
    params = 2 * unit * gather if s.sharding == "FULL_SHARD" or s.strategy == "fsdp2" else 0
    return params + unit * reduce


def _collective_dtypes(s: Setup, p: Precision) -> tuple[int, int]:
    """Bytes per value all-gathered (weights) and reduced (gradients). FSDP1's MixedPrecision moves
    bf16; FSDP2 as `LanguageModel.configure_model` applies it (no mp_policy) and DDP move the stored dtype."""
    if s.strategy == "fsdp":
        return p.compute, p.compute
    return p.weights, p.grads


def communication_bytes(m: ModelShape, s: Setup) -> float:
    """Bytes each device sends (and receives) per optimizer step."""
    W = s.world_size
    if W == 1 or s.strategy == "single":
        return 0.0
    ring = (W - 1) / W
    p = PRECISIONS[s.precision]
    gather, reduce = _collective_dtypes(s, p)
    if s.strategy == "ddp":  # once per optimizer step: accumulation steps skip the sync
        return 2 * m.parameters * reduce * ring
    gathers = 2 if (s.strategy == "fsdp2" or s.sharding == "FULL_SHARD") else 1
    return (gathers * gather + reduce) * m.parameters * ring * s.accumulation


def collectives_per_step(m: ModelShape, s: Setup) -> int:
    """Collective calls per device and optimizer step (each pays the link's fixed latency)."""
    if s.world_size == 1 or s.strategy == "single":
        return 0
    if s.strategy == "ddp":
        return math.ceil(m.parameters * PRECISIONS[s.precision].grads / DDP_BUCKET_BYTES)
    gathers = 2 if (s.strategy == "fsdp2" or s.sharding == "FULL_SHARD") else 1
    return (gathers + 1) * m.num_units * s.accumulation


def training_flops_per_token(m: ModelShape, s: Setup) -> float:
    """Model FLOPs per token of a training step with its recomputations: activation checkpointing runs the forward
    again (x 4/3); the chunked loss runs the LM head's forward again (2 x hidden x vocab)."""
    flops = m.flops_per_token * (RECOMPUTE_FACTOR if s.activation_checkpointing else 1.0)
    if s.loss_chunk_size is not None and s.micro_batch * m.sequence_length > s.loss_chunk_size:
        flops += 2 * m.hidden_size * m.vocab_size
    return flops


@dataclass(frozen=True)
class Speed:
    peak_flops: float
    mfu: float
    tokens_per_step: int
    compute_seconds: float
    communication_bytes: float
    communication_seconds: Optional[float]   # None: no bandwidth known for this link
    step_seconds: float
    tokens_per_second: float

    @property
    def communication_bound(self) -> bool:
        return self.communication_seconds is not None and self.communication_seconds > self.compute_seconds


def speed(m: ModelShape, s: Setup, device: DeviceSpec, mfu: float) -> Speed:
    """Step time and throughput of the whole job at `mfu` of the device's peak in the compute dtype."""
    peak = device.peak(PRECISIONS[s.precision].compute_dtype)
    tokens_per_device = s.micro_batch * m.sequence_length * s.accumulation
    compute = (tokens_per_device * training_flops_per_token(m, s) + m.optimizer_flops) / (mfu * peak)
    volume = communication_bytes(m, s)
    bandwidth = device.intra_node_bandwidth if s.nodes == 1 else device.inter_node_bandwidth
    comm = None
    if volume and bandwidth:
        comm = volume / bandwidth + collectives_per_step(m, s) * device.collective_latency
    step = max(compute, comm or 0.0) if device.overlaps_communication else compute + (comm or 0.0)
    tokens_per_step = tokens_per_device * s.world_size
    return Speed(peak_flops=peak, mfu=mfu, tokens_per_step=tokens_per_step, compute_seconds=compute,
                 communication_bytes=volume, communication_seconds=comm, step_seconds=step,
                 tokens_per_second=tokens_per_step / step)


def steps_for(tokens: Optional[float], max_steps: Optional[int], tokens_per_step: int) -> Optional[int]:
    """Optimizer steps of the run: enough for a token budget, else the recipe's max_steps."""
    if tokens:
        return math.ceil(tokens / tokens_per_step)
    return max_steps
