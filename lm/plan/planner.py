"""`make_plan`: a recipe + a cluster -> a `Plan` (counts, memory per device, fit, speed, wall time).

The Python entry point of `lm plan` (lm/commands/plan.py prints `format_plan(make_plan(...))`);
benchmarks/plan_check.py calls it to compare plans with measured runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from lm.errors import LMError
from lm.runtime.hardware import auto_precision
from lm.plan.advice import Change, needed_bytes, smallest_fitting_change, usable_bytes
from lm.plan.devices import DeviceSpec, device_spec, host_memory_bytes
from lm.plan.estimate import PRECISIONS, Speed, memory_per_device, speed, steps_for, training_flops_per_token
from lm.plan.recipe import Recipe, read_recipe
from lm.plan.speed_probe import DEFAULT_STEPS, StepProbe, probe_mfu, probe_training_step, skip_reason


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    device: DeviceSpec
    headroom: float
    memory: dict[str, float]           # itemized bytes per device
    other_activations: float           # activation bytes with the other checkpointing setting
    speed: Speed
    steps: Optional[int]               # optimizer steps of the run (token budget or max_steps)
    fits: bool
    change: Optional[Change]           # the smallest change that fits, when it does not
    mfu_source: str = "assumed"        # assumed (the device kind's default) | given (--mfu) | probe
    probe: Optional[StepProbe] = None  # the timed training steps the MFU comes from (mfu_source "probe")
    probe_note: Optional[str] = None   # why no probe ran on cpu (skipped, failed, or --probe_steps 0)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def usable_bytes(self) -> float:
        return usable_bytes(self.device, self.headroom)

    @property
    def wall_seconds(self) -> Optional[float]:
        return None if self.steps is None else self.steps * self.speed.step_seconds


def default_precision(device_kind: str) -> str:
    """What `trainer.precision: null` becomes: on `cpu` (this machine) what `lm fit` picks here (bf16-mixed
    with native bf16, else 32-true: lm.runtime.hardware.auto_precision); on the GPU kinds bf16-mixed."""
    return auto_precision("cpu")[0] if device_kind.lower() == "cpu" else "bf16-mixed"


def make_plan(recipe_args: list[str], device_kind: str = "h100", devices: Optional[int] = None,
              nodes: Optional[int] = None, mfu: Optional[float] = None, tokens: Optional[float] = None,
              peak_flops: Optional[float] = None, memory_gib: Optional[float] = None, headroom: float = 0.1,
              intra_node_bandwidth: Optional[float] = None, inter_node_bandwidth: Optional[float] = None,
              collective_latency: Optional[float] = None, probe_steps: Optional[int] = None) -> Plan:
    """Plan `lm fit <recipe_args>` on `nodes` x `devices` devices of `device_kind` (see `lm plan --help`).

    The MFU: `mfu` when given; else on `cpu` (this machine) the one measured by timing `probe_steps`
    (default `DEFAULT_STEPS`; 0: no probe) of the recipe's own training step here (`lm.plan.speed_probe`),
    unless the recipe is too big to probe; else the device kind's default from devices.yaml."""
    if not 0.0 <= headroom < 1.0:
        raise LMError(f"headroom is the share of device memory kept free, in [0, 1); got {headroom}.")
    if mfu is not None and not 0.0 < mfu <= 1.0:
        raise LMError(f"mfu is a fraction of the peak FLOP/s in (0, 1], e.g. 0.4; got {mfu}.")
    if probe_steps is not None and probe_steps < 0:
        raise LMError(f"probe_steps is a number of training steps to time, >= 0 (0: no probe); got {probe_steps}.")
    kind = device_kind.lower()
    recipe = read_recipe(recipe_args, devices=devices, nodes=nodes, default_precision=default_precision(kind))
    setup, model = recipe.setup, recipe.model
    if kind == "cpu":
        setup = replace(setup, accelerator="cpu")
        recipe = replace(recipe, setup=setup)
    device = device_spec(kind, devices_per_node=setup.devices, compute_dtype=PRECISIONS[setup.precision].compute_dtype,
                         peak_flops=peak_flops, memory_gib=memory_gib)
    if intra_node_bandwidth is not None or inter_node_bandwidth is not None:
        device = replace(device, intra_node_bandwidth=intra_node_bandwidth or device.intra_node_bandwidth,
                         inter_node_bandwidth=inter_node_bandwidth or device.inter_node_bandwidth)
    if collective_latency is not None:
        if collective_latency < 0:
            raise LMError(f"collective_latency is seconds per collective call, >= 0; got {collective_latency}.")
        device = replace(device, collective_latency=collective_latency)
    memory = memory_per_device(model, setup)
    other = memory_per_device(model, replace(setup, activation_checkpointing=not setup.activation_checkpointing))
    fits = needed_bytes(model, setup) <= usable_bytes(device, headroom)
    source, probe, note = ("given", None, None) if mfu is not None else ("assumed", None, None)
    if mfu is None and kind == "cpu":
        mfu, probe, note = _probed_mfu(recipe_args, recipe, device, headroom, probe_steps)
        source = "probe" if probe is not None else "assumed"
    run_speed = speed(model, setup, device, mfu if mfu is not None else device.default_mfu)
    return Plan(recipe=recipe, device=device, headroom=headroom, memory=memory,
                other_activations=other.get("activations", 0.0), speed=run_speed,
                steps=steps_for(tokens, recipe.max_steps, run_speed.tokens_per_step), fits=fits,
                change=None if fits else smallest_fitting_change(model, setup, device, headroom),
                mfu_source=source, probe=probe, probe_note=note)


def _probed_mfu(recipe_args: list[str], recipe: Recipe, device: DeviceSpec, headroom: float,
                steps: Optional[int]) -> tuple[Optional[float], Optional["StepProbe"], Optional[str]]:
    """(MFU, probe, note) from timing `steps` of the recipe's training step in one process of this machine
    with the threads each of its node's processes gets; (None, None, why not) when no probe runs.

    The MFU is the step's FLOPs as the plan counts them (model FLOPs of the micro-batches with the
    recomputations the probed module itself runs -- the model's own activation checkpointing and chunked
    loss, not FSDP's policy, which the probe has no strategy for -- plus the optimizer's) over the probed
    step time and the measured peak: planned with it, one process's compute time is the probed step."""
    if steps == 0:
        return None, None, "no probe (--probe_steps 0)"
    model, setup = recipe.model, recipe.setup
    one_process = replace(setup, strategy="single", devices=1, nodes=1, activation_checkpointing=setup.checkpointing_in_model)
    estimate = speed(model, one_process, device, device.default_mfu).compute_seconds
    fits_here = needed_bytes(model, one_process) <= host_memory_bytes() * (1.0 - headroom)
    reason = skip_reason(estimate, fits_here)
    if reason is not None:
        return None, None, f"probe skipped: {reason}"
    try:
        probe = probe_training_step(recipe_args, setup.precision, setup.micro_batch, model.sequence_length,
                                    accumulation=setup.accumulation, processes=setup.devices,
                                    steps=DEFAULT_STEPS if steps is None else steps)
    except Exception as error:  # noqa: BLE001 - a plan without a probe is still a plan: say why and go on
        return None, None, f"probe failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
    tokens = setup.micro_batch * model.sequence_length * setup.accumulation
    flops = tokens * training_flops_per_token(model, one_process) + model.optimizer_flops
    return probe_mfu(probe, flops, device.peak(PRECISIONS[setup.precision].compute_dtype)), probe, None
