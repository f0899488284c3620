"""One Muon optimizer step of the default recipe's model: torch.optim.Muon (Newton-Schulz in bf16) against
lm's `Muon` with the iteration in fp32, and AdamW for scale.

    python benchmarks/muon_step.py                              # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/muon_step.py      # what a CPU without AVX-512 / native bf16 sees

Why: torch runs Muon's iteration in bf16, which a CPU without native bf16 multiplies with a reference
kernel; `lm.modules.optimizers.Muon` switches to fp32 there (figures: docs/results/figures.md). `ONEDNN_MAX_CPU_ISA=AVX2`
caps oneDNN at AVX2, the closest this machine gets to an AVX2-only CPU. Prints the CPU, the bf16 and fp32
matmul speed, and the median seconds per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import add_model_arguments, model_config  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402
from lm.model import GPT  # noqa: E402
from lm.modules.optimizers import Muon, parameter_groups  # noqa: E402


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def seconds_per_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first step allocates the state: not timed
        for p in params:
            p.grad = torch.randn_like(p)
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(model_config(args, context=256))
    decay, _ = parameter_groups(model, 0.1)
    hidden = [p for p in decay["params"] if p is not model.lm_head.weight]
    print(f"CPU: {describe_cpu()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; "
          f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    print(f"matmul 1024^2: fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.1f} GFLOP/s")
    print(f"{len(hidden)} hidden matrices, {sum(p.numel() for p in hidden) / 1e6:.1f}M parameters")
    rows = {
        "torch.optim.Muon (Newton-Schulz in bf16)": torch.optim.Muon(hidden, adjust_lr_fn="match_rms_adamw"),
        "lm.modules.optimizers.Muon, Newton-Schulz in fp32": Muon(hidden, adjust_lr_fn="match_rms_adamw", newton_schulz_dtype=torch.float32),
        "AdamW (fused), for scale": torch.optim.AdamW(hidden, fused=True),
    }
    for name, optimizer in rows.items():
        print(f"{name:45s} {seconds_per_step(optimizer, hidden, args.repeats):8.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
