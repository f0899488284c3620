"""Peak memory of one training step with and without the memory levers, beside what `lm plan` predicts.

    python benchmarks/memory_levers.py                       # both shapes, every lever (~15 min on 2 busy cores)
    python benchmarks/memory_levers.py --shapes default --precisions bf16-mixed

Levers: `--model.activation_checkpointing true` (each block recomputed in the backward pass) and
`--model.loss_chunk_size N` (the LM head and the loss N tokens at a time), alone and together, against the
plain step. Shapes:
- `gpt2`: experiments/wikitext2_gpt2_small.yaml (12 x 768, dropout 0.1, tied head) with the GPT-2 vocabulary
  of 50,257 tokens, context 512, micro-batch 4, AdamW: the shape a GPU user runs, at a context a CPU steps
  through in minutes;
- `default`: experiments/wikitext2_cpu.yaml as `make train` runs it (4 x 256, context 512, batch 4, vocab
  8,192, Muon).

Each (shape, precision, levers) runs in a fresh process (`lm.plan.probe.measure_step_memory`): the recipe's
module, its optimizer, a random batch; one step to allocate the optimizer state, then the peak resident memory
(VmHWM, reset through /proc/self/clear_refs) of a second step over the resident memory before it. glibc is set
to give freed tensors back at once (`MEASURE_ENV`), so the peak follows live tensors. Beside it: the memory
`lm plan --device_kind cpu` plans for what a step allocates (activations, temporary logits, recomputed block,
gradients, bf16 weight copies; the weights and optimizer state exist before the step), and both drops from
the plain step, with measured / predicted. Prints the CPU first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.plan import make_plan  # noqa: E402
from lm.plan.probe import measure_step_memory  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "gpt2": ["--config", str(ROOT / "experiments" / "wikitext2_gpt2_small.yaml"), "--data.vocab_size", "50257",
             "--model.config.max_position_embeddings", "512", "--data.batch_size", "4"],
    "default": ["--config", str(ROOT / "experiments" / "wikitext2_cpu.yaml")],
}
STEP_ITEMS = ("activations", "temporary logits", "recomputed block", "gradients", "bf16 weight copies")
MIB = 2**20


def levers(chunk: int) -> dict[str, list[str]]:
    checkpointing = ["--model.activation_checkpointing", "true"]
    chunked = ["--model.loss_chunk_size", str(chunk)]
    return {"plain": [], "activation checkpointing": checkpointing, f"loss chunks of {chunk}": chunked,
            "both": checkpointing + chunked}


def planned_step_bytes(args: list[str], precision: str) -> float:
    """What `lm plan --device_kind cpu` plans for the memory one step allocates (no speed probe: memory only)."""
    plan = make_plan([*args, "--trainer.precision", precision], device_kind="cpu", devices=1, probe_steps=0,
                     peak_flops=1e12)
    return sum(plan.memory.get(item, 0.0) for item in STEP_ITEMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="gpt2,default", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="32-true and/or bf16-mixed")
    parser.add_argument("--chunk", type=int, default=1024, help="--model.loss_chunk_size of the chunked runs")
    args = parser.parse_args()
    print(f"CPU: {describe_cpu()}")
    print(f"{'shape':<8} {'precision':<11} {'levers':<26} {'measured MiB':>12} {'planned MiB':>11} "
          f"{'measured drop':>13} {'planned drop':>12} {'ratio':>6} {'s':>5}", flush=True)
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            base: tuple[float, float] | None = None
            for name, extra in levers(args.chunk).items():
                started = time.perf_counter()
                recipe = SHAPES[shape]
                measured = measure_step_memory([*recipe, *extra], precision)["step_peak"]
                planned = planned_step_bytes([*recipe, *extra], precision)
                base = base or (measured, planned)
                drop = ""
                if name != "plain":
                    measured_drop, planned_drop = base[0] - measured, base[1] - planned
                    drop = (f"{measured_drop / MIB:13,.0f} {planned_drop / MIB:12,.0f} "
                            f"{measured_drop / planned_drop if planned_drop else float('nan'):6.2f}")
                else:
                    drop = f"{'':13} {'':12} {'':6}"
                print(f"{shape:<8} {precision:<11} {name:<26} {measured / MIB:12,.0f} {planned / MIB:11,.0f} {drop} "
                      f"{time.perf_counter() - started:5.0f}", flush=True)


if __name__ == "__main__":
    main()
