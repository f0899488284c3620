"""`lm plan` against real `lm fit` runs on this CPU: model/optimizer memory and tokens/s, per strategy.

    nice -n 5 python benchmarks/plan_check.py                     # 1 process, DDP x2, FSDP2 x2; ~25 min
    nice -n 5 python benchmarks/plan_check.py --strategies single --steps 6

Runs the base CPU recipe (experiments/wikitext2_cpu.yaml on the offline WikiText-2 files, no validation)
for a few steps, at 6 layers x 384 ("big") and shrunk to 1 layer x 64 wide ("small"), each as 1 process,
DDP over 2 processes (experiments/trainer/ddp.yaml) and FSDP2 over 2 (experiments/trainer/fsdp2_cpu.yaml),
with `lm.plan.probe.MemoryProbe` in the run.

- Memory: the plan's weights + gradients + optimizer state (+ DDP buckets, + the EMA callback's averaged
  copy) per device, big minus small,
  against the measured resident memory after an optimizer step, big minus small (the run's fixed costs
  cancel; see lm/plan/probe.py), averaged over ranks.
- Speed: timed in a second run of each big recipe, and in the calibration runs, without the memory probe's
  allocator settings (which make every large tensor a fresh mapping: page faults that slow FSDP2's
  buffer-heavy steps by ~40%, far more than a 1-process run), so every tokens/s is what `lm fit` gets.
  A device here is one process with its threads. Its MFU is calibrated on independent 1-process
  runs of the big model with the threads each device gets, as many side by side as the run has
  processes (1 run of 2 threads; 2 runs of 1 thread at once, as Lightning splits the cores between 2
  processes), with the predicted run's optimizer (the recipe's Muon; AdamW for FSDP2): tokens/s x FLOPs
  per token (the optimizer's included) / the matmul peak measured in the runs' compute dtype with those
  threads. Every big run is then predicted from the MFU and peak of its devices, as a plan from
  measured devices to a job over them: the 1-process row repeats its calibration (run-to-run noise),
  the DDP and FSDP2 rows test the strategy model, with gloo's bandwidth and per-collective cost measured
  here first (`lm.plan.probe.measure_gloo`). Small runs are overhead-bound and not predicted.
The machine is shared with other jobs: the load is printed and the timings are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.hardware import describe_cpu  # noqa: E402
from lm.plan import make_plan  # noqa: E402
from lm.plan.devices import GIB, cpu_threads_per_process, measure_cpu_peak  # noqa: E402
from lm.plan.estimate import PRECISIONS  # noqa: E402
from lm.plan.planner import default_precision  # noqa: E402
from lm.plan.recipe import read_recipe  # noqa: E402
from lm.plan.probe import measure_fit, measure_gloo, prepare_data  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
STRATEGY_OVERLAYS = {"single": [], "ddp": ["--config", str(ROOT / "experiments/trainer/ddp.yaml")],
                     "fsdp2": ["--config", str(ROOT / "experiments/trainer/fsdp2_cpu.yaml")]}
# "big": 6 x 384 (13.9M parameters, the CPU recipe's shape before it moved to 4 x 256 for CPUs without native
# bf16): large enough that its memory stands well out of page-level noise; "small": 1 x 64.
SIZES = {"big": ["--model.config.hidden_size", "384", "--model.config.num_hidden_layers", "6",
                 "--model.config.num_attention_heads", "6", "--model.config.activation", "gelu",
                 "--model.config.dropout", "0.3"],
         "small": ["--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "1",
                              "--model.config.num_attention_heads", "4"]}
MODEL_PART = ("weights", "gradients", "optimizer state", "ddp gradient buckets", "averaged weights")


def recipe_args(args, strategy: str, size: str, cache: Path) -> list[str]:
    return [
        "--config", str(ROOT / "experiments/wikitext2_cpu.yaml"), *STRATEGY_OVERLAYS[strategy], *SIZES[size],
        "--data.train_files", f"[{args.train_file}]", "--data.val_files", "null", "--data.test_files", "null",
        "--data.cache_dir", str(cache), "--data.batch_size", str(args.batch_size),
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--experiment", f"{strategy}-{size}",
    ]


def model_part(plan) -> float:
    return sum(v for k, v in plan.memory.items() if k in MODEL_PART)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_OVERLAYS), choices=list(STRATEGY_OVERLAYS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-file", default=str(WIKITEXT))
    args = parser.parse_args()
    if not Path(args.train_file).is_file():
        sys.exit(f"Training text not found: {args.train_file} (pass --train-file).")
    print(f"CPU: {describe_cpu()}; load average before: {os.getloadavg()[0]:.2f}")
    peaks = measure_peaks(args)
    gloo = measure_gloo()  # this machine's link, as the peak is this machine's: the plan is of measured devices
    print(f"gloo, 2 processes of 1 thread: {gloo['bandwidth'] / 1e9:.3f} GB/s per rank, "
          f"{gloo['collective_latency'] * 1e3:.2f} ms per collective after compute "
          f"({gloo['idle_latency'] * 1e3:.2f} ms back to back)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(recipe_args(args, "single", "big", Path(tmp) / "cache"))
        mfus: dict[tuple[int, str], float] = {}  # (processes, optimizer) -> calibrated MFU
        for strategy in args.strategies:
            result = {size: run(args, strategy, size, Path(tmp), peaks, mfus, gloo) for size in SIZES}
            big_plan, _, big_runs = result["big"]
            print(f"{strategy}: the runs computed in {', '.join(sorted({str(r.get('precision')) for r in big_runs}))}, "
                  f"the plan assumes {big_plan.recipe.setup.precision}", flush=True)
            rows.append(compare(strategy, result, big_plan, calibration=strategy == "single"))
    print_table(rows, mfus)
    print(f"load average after: {os.getloadavg()[0]:.2f} (2 cores shared with other agents: timings are noisy)")


def measure_peaks(args) -> dict[int, float]:
    """Matmul peak per process count, in the dtype the runs compute in (`precision: null` is bf16-mixed
    on a CPU with native bf16), with the threads each process gets."""
    recipe = recipe_args(args, "single", "big", Path("unused"))
    precision = read_recipe(recipe, default_precision=default_precision("cpu")).setup.precision
    dtype = PRECISIONS[precision].compute_dtype
    # best of ~3 s each: a 1 s probe on this VM has come out 14% low (an MFU over 100% followed)
    peaks = {n: measure_cpu_peak(dtype, processes=n, seconds=3.0) for n in (1, 2)}
    for n, peak in peaks.items():
        print(f"{precision} runs: {dtype} matmul peak, {cpu_threads_per_process(n)} thread(s) per process "
              f"({n} process(es)): {peak / 1e9:.1f} GFLOP/s")
    return peaks


def calibrate(args, tmp: Path, peaks: dict[int, float], processes: int, optimizer: str) -> float:
    """The MFU of one device (a process with its threads) running `processes` side by side with `optimizer`.

    A 2-thread process reaches a lower MFU on this small model than a 1-thread one (its ops are too small
    to split well), and a process alone on the machine runs faster than next to another (shared caches,
    memory bandwidth): so the 1-thread devices of the 2-process runs are calibrated on 2 independent
    1-process runs side by side (OMP_NUM_THREADS=1, no communication), the 1-process run on itself. The
    optimizer is the predicted run's: Muon's Newton-Schulz products are large matmuls that run nearer the
    peak than a training step does, so an MFU measured with Muon over-predicts an AdamW run (FSDP2's).
    What the predictions then test is the plan's strategy model: tokens per step, sharding, communication.
    """
    recipe = [*recipe_args(args, "single", "big", tmp / "cache"), "--model.optimizer", optimizer]
    plan = make_plan(recipe, device_kind="cpu", peak_flops=peaks[1], mfu=0.5)
    # FLOPs per token as the plan counts them: the model's, plus the optimizer's per step spread over its tokens
    flops_per_token = plan.recipe.model.flops_per_token + plan.recipe.model.optimizer_flops / plan.speed.tokens_per_step
    threads = cpu_threads_per_process(processes)
    env = {"OMP_NUM_THREADS": str(threads)}
    with ThreadPoolExecutor(processes) as pool:  # the fits run as subprocesses, side by side
        runs = list(pool.map(lambda i: measure_fit(recipe, tmp / f"calibrate-{processes}-{optimizer}-{i}", env=env,
                                                   memory=False)[0], range(processes)))
    mfu = statistics.fmean(r["tokens_per_second"] for r in runs) * flops_per_token / peaks[processes]
    print(f"calibration: {processes} independent 1-process run(s) of {threads} thread(s) side by side, {optimizer}: "
          f"{mfu:.1%} of the measured peak each", flush=True)
    return mfu


def run(args, strategy: str, size: str, tmp: Path, peaks: dict[int, float], mfus: dict[tuple[int, str], float],
        gloo: dict[str, float]):
    """(plan at the calibrated MFU of its processes' thread count and optimizer and the measured gloo link,
    memory records, speed records) of one recipe: `lm fit` once under the memory probe's allocator settings
    and, for the recipe's size, once more as a user runs it, for the speed (see `measure_fit`)."""
    recipe = recipe_args(args, strategy, size, tmp / "cache")
    records = measure_fit(recipe, tmp / f"{strategy}-{size}")
    speed_records = measure_fit(recipe, tmp / f"{strategy}-{size}-speed", memory=False) if size == "big" else []
    processes = len(records)
    optimizer = "muon" if make_plan(recipe, device_kind="cpu", peak_flops=peaks[processes], mfu=0.5).recipe.model.optimizer_flops else "adamw"
    if (processes, optimizer) not in mfus:
        mfus[processes, optimizer] = calibrate(args, tmp, peaks, processes, optimizer)
    return make_plan(recipe, device_kind="cpu", peak_flops=peaks[processes], mfu=mfus[processes, optimizer],
                     intra_node_bandwidth=gloo["bandwidth"], collective_latency=gloo["collective_latency"]), records, speed_records


def compare(strategy, result, big_plan, calibration: bool) -> dict:
    small_plan, small_runs, _ = result["small"]
    _, big_runs, speed_runs = result["big"]
    measured_tps = statistics.fmean(r["tokens_per_second"] for r in speed_runs)
    measured = statistics.fmean(r["model_rss"] for r in big_runs) - statistics.fmean(r["model_rss"] for r in small_runs)
    planned = model_part(big_plan) - model_part(small_plan)
    peak = statistics.fmean(r["peak_rss"] for r in big_runs)
    return {"strategy": strategy, "processes": len(big_runs), "planned_mib": planned / 2**20,
            "measured_mib": measured / 2**20, "memory_error": measured / planned - 1,
            "planned_peak_mib": big_plan.total_bytes / 2**20, "measured_peak_mib": peak / 2**20,
            "planned_tps": big_plan.speed.tokens_per_second, "measured_tps": measured_tps,
            "tps_error": measured_tps / big_plan.speed.tokens_per_second - 1, "calibration": calibration}


def print_table(rows: list[dict], mfus: dict[tuple[int, str], float]) -> None:
    print("\n| strategy | processes | model+optimizer MiB planned | measured | error | tokens/s planned | measured | "
          "error | peak RSS MiB/process (whole process) | planned total/device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps_error = f"{r['tps_error']:+.1%}" + (" (its own calibration run: repeatability)" if r["calibration"] else "")
        print(f"| {r['strategy']} | {r['processes']} | {r['planned_mib']:.1f} | {r['measured_mib']:.1f} | "
              f"{r['memory_error']:+.1%} | {r['planned_tps']:,.0f} | {r['measured_tps']:,.0f} | {tps_error} | "
              f"{r['measured_peak_mib']:.0f} | {r['planned_peak_mib']:.0f} |")
    print(f"\nSpeed: MFU per device calibrated on independent 1-process runs, as many side by side as the "
          f"run has processes, with its optimizer: {', '.join(f'{n} side by side, {o}: {m:.1%}' for (n, o), m in sorted(mfus.items()))}.")
    print("Memory: big (recipe size) minus small (1 layer x 64) model, so Python/torch/Lightning/data costs "
          "cancel; resident memory after an optimizer step, mean over ranks.")


if __name__ == "__main__":
    main()
