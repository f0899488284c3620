"""`format_plan`: a `Plan` as the text `lm plan` prints (model, memory per device, fit, speed, time)."""

from __future__ import annotations

from lm.plan.advice import does_not_fit_message
from lm.plan.devices import GIB
from lm.plan.planner import Plan

STRATEGY_NAMES = {"single": "one device", "ddp": "DDP (replicated)", "fsdp": "FSDP",
                  "fsdp2": "FSDP2 (fully_shard, FULL_SHARD)"}
COLLECTIVES = {"ddp": "gradient all-reduce", "fsdp": "weight all-gathers + gradient reduce-scatter",
               "fsdp2": "weight all-gathers + gradient reduce-scatter"}


def format_plan(plan: Plan) -> str:
    return "\n".join(_header(plan) + _model(plan) + _memory(plan) + _speed(plan) + _sources(plan)) + "\n"


def _header(plan: Plan) -> list[str]:
    s, d = plan.recipe.setup, plan.device
    strategy = STRATEGY_NAMES[s.strategy] + (f" {s.sharding}" if s.strategy == "fsdp" else "")
    checkpointing = ", activation checkpointing" if s.activation_checkpointing else ""
    if s.loss_chunk_size is not None:
        checkpointing += f", LM head and loss in chunks of {s.loss_chunk_size} tokens"
    name = f"{plan.recipe.experiment}: " if plan.recipe.experiment else ""
    return [f"{name}{s.nodes} node(s) x {s.devices} {d.name} = {s.world_size} device(s); "
            f"{strategy}, {s.precision}{checkpointing}", ""]


def _model(plan: Plan) -> list[str]:
    m, s = plan.recipe.model, plan.recipe.setup
    return [
        "Model",
        f"  parameters        {m.parameters / 1e6:,.2f} M ({m.non_embedding_parameters / 1e6:,.2f} M without embeddings)",
        f"  FLOPs per token   {m.flops_per_token / 1e6:,.1f} MFLOP (training: forward + backward, sequence {m.sequence_length})",
        f"  tokens per step   {s.micro_batch} x {m.sequence_length} x {s.accumulation} accumulation x "
        f"{s.world_size} devices = {plan.speed.tokens_per_step:,}",
        "",
    ]


def _memory(plan: Plan) -> list[str]:
    s = plan.recipe.setup
    lines = ["Memory per device (GiB)"]
    lines += [f"  {name:<22}{value / GIB:9.3f}" for name, value in plan.memory.items()]
    lines.append(f"  {'total':<22}{plan.total_bytes / GIB:9.3f}   of {plan.usable_bytes / GIB:.1f} usable "
                 f"({plan.device.memory_bytes / GIB:.1f} GiB, {plan.headroom:.0%} headroom)")
    other = "with" if not s.activation_checkpointing else "without"
    lines.append(f"  activations {other} activation checkpointing: {plan.other_activations / GIB:.3f} "
                 f"(micro-batch {s.micro_batch})")
    if plan.fits:
        lines.append("  fits")
    else:
        lines.append(f"  {does_not_fit_message(plan.recipe.model, s, plan.device, plan.headroom)}")
        if plan.change is None:
            lines.append("  nothing tried makes it fit (micro-batch 1, chunked loss, checkpointing, FSDP, more nodes, "
                         "bf16-true)")
        else:
            lines.append(f"  smallest change that fits ({plan.change.needed_bytes / GIB:.1f} GiB): "
                         f"{plan.change.description}")
    return lines + [""]


def _speed(plan: Plan) -> list[str]:
    sp, s, d = plan.speed, plan.recipe.setup, plan.device
    dtype = "bf16" if "bf16" in s.precision else ("fp16" if "16" in s.precision else "fp32")
    measured = " (measured)" if "peak_flops" in d.measured else ""
    lines = ["Speed", *_mfu(plan, f"{_rate(sp.peak_flops, 'FLOP/s')} {dtype} peak{measured}"),
             f"  compute per step  {_duration(sp.compute_seconds)}"
             + (f" (incl. the optimizer's {plan.recipe.model.optimizer_flops / 1e9:,.1f} GFLOP)"
                if plan.recipe.model.optimizer_flops else "")]
    if sp.communication_bytes:
        link = "intra-node" if s.nodes == 1 else "inter-node"
        time = (f"{_duration(sp.communication_seconds)} at {_bandwidth(d, s.nodes) / 1e9:,.3g} GB/s {link}"
                if sp.communication_seconds is not None else f"time not modelled ({link} bandwidth unknown)")
        lines.append(f"  communication     {sp.communication_bytes / 1e9:,.3f} GB per device per step "
                     f"({COLLECTIVES[s.strategy]}); {time}")
        if sp.communication_bound and d.overlaps_communication:
            lines.append("  communication-bound: it takes longer than the compute it should hide behind")
    overlap = ""
    if sp.communication_bytes:
        overlap = (" (compute and communication overlapped)" if d.overlaps_communication
                   else " (compute + communication: the collectives run on the same cores)")
    lines += [f"  step              {_duration(sp.step_seconds)}{overlap}",
              f"  throughput        {sp.tokens_per_second:,.0f} tokens/s ({sp.tokens_per_second / s.world_size:,.0f} "
              f"per device)"]
    if plan.steps is not None:
        tokens = plan.steps * sp.tokens_per_step
        lines.append(f"  wall time         {_duration(plan.wall_seconds)} for {plan.steps:,} steps "
                     f"({_count(tokens)} tokens), {_duration(plan.wall_seconds * s.world_size)} device-time")
    else:
        lines.append("  wall time         no trainer.max_steps in the recipe: pass --tokens N for a token budget")
    return lines + [""]


def _mfu(plan: Plan, peak: str) -> list[str]:
    """Where the MFU comes from: a probe of the recipe's step on this machine, --mfu, or the table."""
    mfu, probe, s = plan.speed.mfu, plan.probe, plan.recipe.setup
    if plan.mfu_source == "probe" and probe is not None:
        with_callbacks = f", with {', '.join(probe.callbacks)}" if probe.callbacks else ""
        lines = [f"  MFU measured by a {probe.steps}-step probe  {mfu:.1%} of {peak}",
                 f"                    the recipe's training step timed here: {_duration(probe.step_seconds)} (median of "
                 f"{probe.steps} after {probe.warmup_steps} warm-up steps),",
                 f"                    1 process of {probe.threads} thread(s), {probe.precision}{with_callbacks}"]
        if s.world_size > 1:
            lines.append(f"                    applied per device: each of the {s.devices} processes per node gets "
                         f"{probe.threads} thread(s)")
        return lines
    if plan.mfu_source == "given":
        return [f"  MFU (--mfu)       {mfu:.0%} of {peak}"]
    lines = [f"  assumed MFU       {mfu:.0%} of {peak}"]
    if plan.probe_note:
        lines.append(f"                    ({plan.probe_note}: the table's MFU, devices.yaml)")
    return lines


def _sources(plan: Plan) -> list[str]:
    return ["Device figures: " + "; ".join(plan.device.sources)]


def _bandwidth(device, nodes: int) -> float:
    return device.intra_node_bandwidth if nodes == 1 else device.inter_node_bandwidth


def _rate(value: float, unit: str) -> str:
    """1.2e12 -> '1.2 TFLOP/s'; 9.4e9 -> '9.4 GFLOP/s'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:,.3g} {prefix}{unit}"
    return f"{value:,.3g} {unit}"


def _count(n: float) -> str:
    return f"{n / 1e9:,.3g}B" if n >= 1e9 else f"{n / 1e6:,.3g}M"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
