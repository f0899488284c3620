"""`lm plan`: will a recipe fit, how fast will it train and how long will it take, on a given cluster.

    lm plan --config experiments/gpt2_small_8gpu.yaml --devices 8 --device_kind h100
    lm plan --config experiments/gpt2_small_8gpu.yaml --config experiments/trainer/fsdp.yaml --devices 8
    lm plan --config experiments/wikitext2_cpu.yaml --device_kind cpu        # times the recipe's step here
    lm plan --config experiments/wikitext2_cpu.yaml --device_kind cpu --probe_steps 0   # no probe: table MFU
    lm plan --config ... --nodes 2 --devices 8 --mfu 0.35 --tokens 10e9 --data.batch_size 8

Every argument that is not one of this verb's own (`--config`, `--trainer.*`, `--model.*`, `--data.*`)
is the recipe, read exactly as `lm fit` reads it. Nothing is downloaded and no data is read: the model is
built on the meta device; on `--device_kind cpu` its training step is also timed for a few steps on random
tokens (the speed probe, lm/plan/speed_probe.py), unless `--mfu` or `--probe_steps 0` is given.
"""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Optional

from lm.errors import LMError
from lm.plan import format_plan, make_plan


def plan(
    recipe: Optional[list[str]] = None,
    device_kind: str = "h100",
    devices: Optional[int] = None,
    nodes: Optional[int] = None,
    mfu: Optional[float] = None,
    tokens: Optional[float] = None,
    peak_flops: Optional[float] = None,
    memory_gib: Optional[float] = None,
    headroom: float = 0.1,
    intra_node_bandwidth: Optional[float] = None,
    inter_node_bandwidth: Optional[float] = None,
    collective_latency: Optional[float] = None,
    probe_steps: Optional[int] = None,
) -> None:
    """Plan a recipe on a cluster: memory per device, whether it fits, tokens/s and wall time.

    Prints parameters, FLOPs per token, tokens per step, memory per device (itemized), whether it fits
    (and the smallest change that makes it fit), throughput, communication per step and wall time.
    `--config FILE` is the recipe's (as in `lm fit`), not a file of this verb's options.

    Args:
        recipe: The recipe's `lm fit` arguments. Collected from the command line: every `--config FILE`
            (repeatable, later files override earlier ones) and `--section.key value` override.
        device_kind: Device to plan for: h100, a100, l4 or cpu (lm/plan/devices.yaml). cpu is this
            machine: one device is one process, its peak FLOP/s is measured now.
        devices: Devices per node (default: the recipe's trainer.devices).
        nodes: Nodes (default: the recipe's trainer.num_nodes).
        mfu: Model FLOPs utilization to assume, a fraction of the peak. Default on cpu: measured by timing
            the recipe's own training step here (see probe_steps); on the GPU kinds: the kind's in
            devices.yaml. Take it from a real run's `train/device/mfu` (experiments/trainer/callbacks/
            throughput.yaml) when you have one.
        tokens: Token budget of the run (default: the recipe's trainer.max_steps).
        peak_flops: Peak FLOP/s of one device in the training dtype, instead of the table's (or the
            measured one on cpu).
        memory_gib: Memory of one device in GiB, instead of the table's.
        headroom: Share of device memory kept free for the CUDA context, NCCL buffers and allocator
            fragmentation.
        intra_node_bandwidth: Bytes/s in one direction between devices of a node, instead of the table's.
        inter_node_bandwidth: Bytes/s in one direction per device across nodes, instead of the table's.
        collective_latency: Seconds each collective call costs whatever its size, instead of the table's
            (for cpu: `collective_latency` of `python -c "from lm.plan.probe import measure_gloo;
            print(measure_gloo())"` on your machine).
        probe_steps: cpu only, without --mfu: time this many optimizer steps (default 10, after 3 warm-up
            steps, at most ~30 s) of the recipe's training step in one process here (its model, precision,
            optimizer, per-step callbacks, through Lightning's loop, on random tokens) and plan with the
            MFU they reach. 0: no probe, the table's MFU. Skipped with a note when the recipe is too big to
            probe in ~30 s or does not fit in memory; a multi-process recipe is probed as one of its
            processes and that MFU applied per device.
    """
    if not recipe:
        raise LMError("No recipe given: pass it as to lm fit, e.g. lm plan --config experiments/wikitext2_cpu.yaml "
                         "--device_kind cpu.")
    result = make_plan(recipe, device_kind=device_kind, devices=devices, nodes=nodes, mfu=mfu, tokens=tokens,
                       peak_flops=peak_flops, memory_gib=memory_gib, headroom=headroom,
                       intra_node_bandwidth=intra_node_bandwidth, inter_node_bandwidth=inter_node_bandwidth,
                       collective_latency=collective_latency, probe_steps=probe_steps)
    print(format_plan(result), end="")


_OWN_FLAGS = {f"--{name}" for name in inspect.signature(plan).parameters if name != "recipe"}


def prepare_args(args: list[str]) -> list[str]:
    """Keep this verb's own flags (`--device-kind` is accepted for `--device_kind`); pass everything
    else (`--config`, `--trainer.devices 2`, ...) to the recipe, verbatim, as one JSON list. A near miss
    of an own flag (`--device_knd`, `--mfuu`) stays here too, so its error suggests the flag it missed
    instead of listing the recipe's keys."""
    own_names = [flag[2:] for flag in _OWN_FLAGS]
    own: list[str] = []
    recipe: list[str] = []
    target = recipe
    for arg in args:
        if arg.startswith("-") and not arg[1:2].isdigit() and not arg.startswith("-."):  # a flag, not -0.5
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and "." not in flag:  # --device-kind -> --device_kind
                flag = "--" + flag[2:].replace("-", "_")
            near_miss = flag.startswith("--") and "." not in flag and difflib.get_close_matches(flag[2:], own_names,
                                                                                                 cutoff=0.75)
            target = own if flag in _OWN_FLAGS or flag in ("-h", "--help") or near_miss else recipe
            arg = flag + eq + value
        target.append(arg)
    if recipe:
        own += ["--recipe", json.dumps(recipe)]
    return own
