"""Does a setup fit its device, and if not, the smallest change that makes it fit.

Changes are tried from the cheapest to the dearest (`candidate_changes`), and the first that fits wins:
1. a smaller micro-batch with more accumulation (same tokens per step, same result, a bit slower);
2. the LM head and loss in chunks of tokens (one more forward of the head per step);
3. activation checkpointing (one more forward per step: ~4/3 the compute), the model's own on one device
   or DDP, FSDP's policy under FSDP; then with the chunked loss too;
4. sharding with FSDP over the same devices (more communication);
5. sharding, checkpointing and the chunked loss together, then with a micro-batch of 1;
6. more nodes with FSDP (same devices per node; more money);
7. bf16-true, as a last resort (half the bytes, worse loss: small updates are rounded away).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

from lm.plan.devices import GIB, DeviceSpec
from lm.plan.estimate import memory_per_device
from lm.plan.recipe import ModelShape, Setup

MAX_NODES = 128  # the search for "more nodes" stops here
LOSS_CHUNK = 1024  # the chunk suggested: its logits are small beside a GPU's memory, the loop short


@dataclass(frozen=True)
class Change:
    description: str      # what to change, in words and flags
    setup: Setup
    needed_bytes: float


def needed_bytes(m: ModelShape, s: Setup) -> float:
    return sum(memory_per_device(m, s).values())


def usable_bytes(device: DeviceSpec, headroom: float) -> float:
    """Device memory minus a share kept free (CUDA context, NCCL buffers, allocator fragmentation)."""
    return device.memory_bytes * (1.0 - headroom)


def does_not_fit_message(m: ModelShape, s: Setup, device: DeviceSpec, headroom: float) -> str:
    need, have = needed_bytes(m, s), usable_bytes(device, headroom)
    return (f"does not fit: needs {need / GIB:.1f} GiB per device, has {have / GIB:.1f} GiB "
            f"({device.memory_bytes / GIB:.0f} GiB {device.kind} minus {headroom:.0%} headroom)")


def smallest_fitting_change(m: ModelShape, s: Setup, device: DeviceSpec, headroom: float) -> Optional[Change]:
    """The first of `candidate_changes` whose memory fits, or None when none does."""
    have = usable_bytes(device, headroom)
    for description, setup in candidate_changes(s):
        need = needed_bytes(m, setup)
        if need <= have:
            return Change(description, setup, need)
    return None


def candidate_changes(s: Setup) -> Iterator[tuple[str, Setup]]:
    for micro in _smaller_micro_batches(s.micro_batch):
        accumulation = s.accumulation * s.micro_batch // micro
        yield (f"micro-batch {micro} with {accumulation} accumulation steps (same tokens per step): "
               f"--data.batch_size {micro} --trainer.accumulate_grad_batches {accumulation}",
               replace(s, micro_batch=micro, accumulation=accumulation))
    fsdp = "FSDPStrategy (experiments/trainer/fsdp.yaml)"
    chunk = f"--model.loss_chunk_size {LOSS_CHUNK}"
    chunked = s if s.loss_chunk_size is not None else replace(s, loss_chunk_size=LOSS_CHUNK)
    if s.loss_chunk_size is None:
        yield f"the LM head and loss in chunks of {LOSS_CHUNK} tokens: {chunk}", chunked
    if not s.activation_checkpointing:
        if s.strategy == "fsdp":  # FSDP1 wraps the blocks itself; the model's own would recompute them twice
            where, checkpointed = "its activation_checkpointing_policy", replace(s, activation_checkpointing=True)
        else:
            where = "--model.activation_checkpointing true"
            checkpointed = replace(s, activation_checkpointing=True, checkpointing_in_model=True)
        yield f"activation checkpointing of every Block: {where}", checkpointed
        if s.loss_chunk_size is None:
            yield (f"activation checkpointing and the chunked loss: {where} {chunk}",
                   replace(checkpointed, loss_chunk_size=LOSS_CHUNK))
    if s.world_size > 1 and not (s.strategy in ("fsdp", "fsdp2") and s.sharding == "FULL_SHARD"):
        yield (f"shard weights, gradients and optimizer state over the {s.world_size} devices: {fsdp} with "
               f"sharding_strategy FULL_SHARD", replace(s, strategy="fsdp", sharding="FULL_SHARD"))
    # FSDP's policy checkpoints the blocks: a model-level checkpointing must then be dropped (lm fit refuses both).
    sharded = replace(chunked, strategy="fsdp", sharding="FULL_SHARD", activation_checkpointing=True,
                      checkpointing_in_model=False)
    levers = "activation checkpointing" + ("" if s.loss_chunk_size is not None else " and the chunked loss")
    flags = ((" (without --model.activation_checkpointing)" if s.checkpointing_in_model else "")
             + ("" if s.loss_chunk_size is not None else f" {chunk}"))
    if s.world_size > 1:
        yield f"FULL_SHARD, {levers}: {fsdp}{flags}", sharded
    one = replace(sharded, micro_batch=1, accumulation=s.accumulation * s.micro_batch)
    yield (f"FULL_SHARD, {levers} and micro-batch 1: {fsdp}{flags} --data.batch_size 1 "
           f"--trainer.accumulate_grad_batches {one.accumulation}", one)
    for nodes in range(s.nodes + 1, MAX_NODES + 1):
        yield (f"{nodes} nodes x {s.devices} devices with FULL_SHARD, {levers}: {fsdp}{flags} "
               f"--trainer.num_nodes {nodes} (tokens per step grow with the world size)", replace(sharded, nodes=nodes))
    if s.precision != "bf16-true":
        yield ("bf16-true (weights and optimizer state in bf16; expect a worse loss): "
               "--config experiments/trainer/bf16_true.yaml", replace(s, precision="bf16-true"))


def _smaller_micro_batches(micro_batch: int) -> list[int]:
    """Divisors of the micro-batch below it, largest first, so tokens per step stay the same."""
    return [d for d in range(micro_batch - 1, 0, -1) if micro_batch % d == 0]
