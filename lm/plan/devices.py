"""The device kinds `lm plan` knows (devices.yaml, shipped with the package) as `DeviceSpec`s.

- `known_device_kinds()`: the kinds in the table (h100, a100, l4, cpu).
- `device_spec(kind, devices_per_node, ...)`: one kind's peak FLOP/s per dtype, memory and
  interconnect; an unknown kind is an error that lists the known ones. For `cpu` (one device = one
  process) the peak is measured here with the threads one process gets, and the memory is the host's
  split among a node's processes, unless given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import yaml

from lm.callbacks import measure_matmul_flops
from lm.errors import LMError
from lm.runtime.hardware import usable_cpus

DEVICES_FILE = Path(__file__).with_name("devices.yaml")
GIB = 2 ** 30


@dataclass(frozen=True)
class DeviceSpec:
    """One device kind. Bandwidths are bytes/s in one direction per device; None: not modelled."""

    kind: str
    name: str
    peak_flops: dict[str, float]          # compute dtype name (float32, tfloat32, bfloat16, float16) -> FLOP/s
    memory_bytes: float
    intra_node_bandwidth: Optional[float]
    inter_node_bandwidth: Optional[float]
    default_mfu: float
    sources: tuple[str, ...] = field(default=())
    collective_latency: float = 0.0       # seconds per collective call, whatever its size
    overlaps_communication: bool = True   # False: collectives run on the cores that compute (gloo on CPUs)
    measured: tuple[str, ...] = field(default=())  # which figures were measured at plan time

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise LMError(f"No {dtype} peak for {self.kind} in {DEVICES_FILE.name}; it has {sorted(self.peak_flops)}.")
        return self.peak_flops[dtype]


@lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    return yaml.safe_load(DEVICES_FILE.read_text(encoding="utf-8"))


def known_device_kinds() -> list[str]:
    return sorted(_table())


def device_spec(kind: str, devices_per_node: int = 1, compute_dtype: str = "float32",
                peak_flops: Optional[float] = None, memory_gib: Optional[float] = None) -> DeviceSpec:
    """The spec of `kind`, with `peak_flops` (for `compute_dtype`) and `memory_gib` overriding the table.

    Only `cpu` measures anything: its peak (a matmul in `compute_dtype` on the threads each of
    `devices_per_node` processes gets, as Lightning splits the cores) and its memory (MemTotal / processes).
    """
    table = _table()
    entry = table.get(kind.lower())
    if entry is None:
        raise LMError(f"Unknown device kind {kind!r}: known kinds are {', '.join(known_device_kinds())} "
                      f"(add one to {DEVICES_FILE}).")
    peaks = entry["peak_flops"]
    measured = []
    if peak_flops is not None:
        peaks = {compute_dtype: float(peak_flops)} if peaks == "measure" else {**peaks, compute_dtype: float(peak_flops)}
    elif peaks == "measure":
        peaks = {compute_dtype: measure_cpu_peak(compute_dtype, devices_per_node)}
        measured.append("peak_flops")
    memory = entry["memory_gib"]
    if memory_gib is not None:
        memory_bytes = float(memory_gib) * GIB
    elif memory == "host":
        memory_bytes = host_memory_bytes() / devices_per_node
        measured.append("memory")
    else:
        memory_bytes = float(memory) * GIB
    bandwidth = {k: None if v is None else float(v) for k, v in (entry.get("bandwidth") or {}).items()}
    return DeviceSpec(kind=kind.lower(), name=entry["name"], peak_flops={k: float(v) for k, v in peaks.items()},
                      memory_bytes=memory_bytes, intra_node_bandwidth=bandwidth.get("intra_node"),
                      inter_node_bandwidth=bandwidth.get("inter_node"), default_mfu=float(entry["default_mfu"]),
                      sources=tuple(entry.get("sources", ())), measured=tuple(measured),
                      collective_latency=float(entry.get("collective_latency", 0.0)),
                      overlaps_communication=bool(entry.get("overlaps_communication", True)))


def cpu_threads_per_process(processes: int) -> int:
    """Threads of each of `processes` CPU processes: Lightning's split (cores // processes), or OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, usable_cpus() // max(1, processes))


def measure_cpu_peak(compute_dtype: str, processes: int = 1, seconds: float = 1.0) -> float:
    """Best matmul FLOP/s in `compute_dtype` with the threads one of `processes` processes gets."""
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads_per_process(processes))
    try:
        return measure_matmul_flops(getattr(torch, compute_dtype), seconds=seconds)
    finally:
        torch.set_num_threads(before)


def host_memory_bytes() -> float:
    """Physical memory of this machine (MemTotal), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
