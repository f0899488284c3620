"""What this machine can do fast, detected rather than assumed: the CPU's name and whether it has
native bf16 (AVX-512-BF16 or AMX), and the training precision that follows from it.

Used by the CLI (a recipe's `trainer.precision: null` means "pick for this machine") and printed by
every benchmark, since the machines running `lm` differ from one session to the next.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from lm.errors import LMError

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of hardware bf16 matmuls


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name in ("", platform.machine()):
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX-512-BF16 or AMX); elsewhere bf16 matmuls are
    emulated and much slower than fp32."""
    return any(flag in _cpuinfo()[1] for flag in NATIVE_BF16_CPU_FLAGS)


def cpu_is_x86() -> bool:
    """Whether this is an x86-64 CPU: where the bf16 decoding default and oneDNN's packed fp32 weights were measured."""
    return platform.machine().lower() in ("x86_64", "amd64")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_has_avx512_vnni() -> bool:
    """True when the CPU has AVX-512 VNNI, whose int8 multiply-add accumulates in int32: int8 kernels can
    then use full 8-bit activations. Without it (AVX2) the 16-bit pair sums saturate unless activations
    are limited to 7 bits (`lm.compress.quantize.int8_route`)."""
    return "avx512_vnni" in _cpuinfo()[1]


def describe_cpu() -> str:
    """One line for logs and benchmark output, e.g. 'AMD EPYC (AVX2, no native bf16), 2 threads'."""
    import torch  # here, not at the top: usable_cpus() serves lm.data's tokenizing workers, which never load torch

    name, _ = _cpuinfo()
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    vnni = ", VNNI" if cpu_has_avx512_vnni() else ""
    return f"{name} ({capability}{vnni}, {bf16}), {torch.get_num_threads()} threads"


def bf16_is_fast(device: str) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 in hardware, the reason) for `device` "cpu", "cuda", "cuda:1", ...: the one
    rule behind the automatic precisions of training (`auto_precision`) and inference (`auto_inference_dtype`)."""
    import torch  # here, not at the top: see describe_cpu

    if str(device).startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} supports bf16"
        return False, "the GPU has no bf16 support"
    if str(device) != "cpu":
        return False, f"device {device}"
    if cpu_has_native_bf16():
        return True, f"the CPU has native bf16 ({describe_cpu()})"
    return False, f"the CPU has no native bf16, where bf16 matmuls are emulated and slow ({describe_cpu()})"


def auto_precision(accelerator: str) -> tuple[str, str]:
    """(Trainer precision, the reason) for an `accelerator` setting ("cpu", "gpu", "cuda", "auto")."""
    fast, why = bf16_is_fast("cuda" if trains_on_cuda(accelerator) else "cpu")
    return ("bf16-mixed" if fast else "32-true"), why


def trains_on_cuda(accelerator: str) -> bool:
    """Whether a Trainer `accelerator` setting ("cpu", "gpu", "cuda", "auto") trains on a CUDA GPU."""
    import torch  # here, not at the top: see describe_cpu

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


# Sequences a decode step may advance together for `auto_inference_dtype` to pick bf16 on a CPU without native bf16:
# there torch multiplies bf16 one row at a time, so its cost grows with the rows; from ~3 rows float32 is faster.
BF16_DECODE_MAX_ROWS = 2


def auto_inference_dtype(device: str, decode_rows: int = 1) -> tuple[str, str]:
    """(dtype name, the reason) for decoding `decode_rows` sequences together (`lm generate`, `lm serve`) or, with
    `decode_rows=0`, scoring (`lm eval`) on `device` when the user leaves it to `lm`: bfloat16 where the hardware
    multiplies it natively (a decode step streams every weight once, and bf16 halves the bytes), else float32, where
    bf16 products are emulated.

    One sequence (or two) at a time on an x86 CPU without native bf16 takes bfloat16 too: torch multiplies a single bf16
    row at the speed of streaming half the bytes (the default recipe's checkpoint decoded 228 against 165 tokens/s in
    float32 on an AVX2 Zen 3), and a prompt's prefill, many rows, is multiplied in float32 there
    (`lm.model.inference.upcast_linear`). A batch of 8 decoded faster in float32 (421 against 303 tokens/s), and
    scoring is many rows throughout: float32."""
    fast, why = bf16_is_fast(device)
    if fast:
        return "bfloat16", why
    if 1 <= decode_rows <= BF16_DECODE_MAX_ROWS and str(device) == "cpu" and cpu_is_x86():
        return "bfloat16", ("the CPU has no native bf16, but decoding one sequence streams every weight once a token "
                            f"and bf16 halves the bytes; a prompt's prefill is multiplied in float32 ({describe_cpu()})")
    return "float32", why


def resolve_inference_dtype(dtype: str, device: str, decode_rows: int = 1) -> tuple[str, str]:
    """(`dtype`, "") as given, or for "auto" the one `auto_inference_dtype` picks on `device` for decoding
    `decode_rows` sequences together (`lm generate`, `lm serve`) or scoring (`lm eval`: 0), with the line that tells
    the user which and why."""
    if dtype != "auto":
        return dtype, ""
    dtype, why = auto_inference_dtype(device, decode_rows)
    return dtype, f"{dtype} weights ({why}; --dtype float32 or bfloat16 to choose)"


def check_device(device: "str | torch.device") -> "torch.device":
    """`device` as a `torch.device` that exists on this machine, else an `LMError` saying what does: asking
    for cuda (or mps) where there is none otherwise fails deep inside torch, after the checkpoint is read."""
    import torch  # here, not at the top: see describe_cpu

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise LMError(f"--device {device!r} is not a device torch knows ({error}): use cpu, cuda or cuda:N.") from error
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(resolved.type)
    if available is not None and not available():
        raise LMError(f"--device {device}: no {resolved.type} device is available on this machine (torch "
                      f"{torch.__version__}): use --device cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise LMError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0 "
                      f"to cuda:{torch.cuda.device_count() - 1}.")
    return resolved
