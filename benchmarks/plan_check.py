"""`lm plan` against real `lm fit` runs on this CPU: model/optimizer memory and tokens/s, per strategy.

    nice -n 5 python benchmarks/plan_check.py                     # 1 process, DDP x2, FSDP2 x2; ~3-5 min
    nice -n 5 python benchmarks/plan_check.py --strategies single --steps 6

Runs the base CPU recipe (experiments/wikitext2_cpu.yaml on the offline WikiText-2 files, no validation)
for a few steps, at its size ("big") and shrunk to 1 layer x 64 wide ("small"), each as 1 process,
DDP over 2 processes (experiments/trainer/ddp.yaml) and FSDP2 over 2 (experiments/trainer/fsdp2_cpu.yaml),
with `lm.plan.probe.MemoryProbe` in the run.

- Memory: the plan's weights + gradients + optimizer state (+ DDP buckets) per device, big minus small,
  against the measured resident memory after an optimizer step, big minus small (the run's fixed costs
  cancel; see lm/plan/probe.py), averaged over ranks.
- Speed: the MFU of the 1-process big run is measured (its tokens/s x FLOPs per token / the matmul peak
  of its 2 threads): that is the calibration. Every other big run is then predicted from that MFU and
  the matmul peak measured with the threads each of its processes gets (Lightning gives 2 processes 1
  core each); small runs are overhead-bound and not predicted.
The machine is shared with other jobs: the load is printed and the timings are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.hardware import describe_cpu  # noqa: E402
from lm.plan import make_plan  # noqa: E402
from lm.plan.devices import GIB, cpu_threads_per_process, measure_cpu_peak  # noqa: E402
from lm.plan.estimate import PRECISIONS  # noqa: E402
from lm.plan.planner import default_precision  # noqa: E402
from lm.plan.recipe import read_recipe  # noqa: E402
from lm.plan.probe import measure_fit, prepare_data  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
STRATEGY_OVERLAYS = {"single": [], "ddp": ["--config", str(ROOT / "experiments/trainer/ddp.yaml")],
                     "fsdp2": ["--config", str(ROOT / "experiments/trainer/fsdp2_cpu.yaml")]}
SIZES = {"big": [], "small": ["--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "1"]}
MODEL_PART = ("weights", "gradients", "optimizer state", "ddp gradient buckets")


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
    # The peak in the dtype the runs compute in: `precision: null` is bf16-mixed on a CPU with native bf16.
    recipe = recipe_args(args, "single", "big", Path("unused"))
    precision = read_recipe(recipe, default_precision=default_precision("cpu")).setup.precision
    dtype = PRECISIONS[precision].compute_dtype
    peaks = {n: measure_cpu_peak(dtype, processes=n) for n in (1, 2)}
    for n, peak in peaks.items():
        print(f"{precision} runs: {dtype} matmul peak, {cpu_threads_per_process(n)} thread(s) per process "
              f"({n} process(es)): {peak / 1e9:.1f} GFLOP/s")
    rows, mfu = [], None
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(recipe_args(args, "single", "big", Path(tmp) / "cache"))
        for strategy in args.strategies:
            result = {}
            for size in SIZES:
                recipe = recipe_args(args, strategy, size, Path(tmp) / "cache")
                records = measure_fit(recipe, Path(tmp) / f"{strategy}-{size}")
                processes = len(records)
                plan = make_plan(recipe, device_kind="cpu", peak_flops=peaks[processes], mfu=mfu or 0.5)
                result[size] = (plan, records)
            big_plan, big_runs = result["big"]
            ran = {r.get("precision") for r in big_runs}
            print(f"{strategy}: the runs computed in {', '.join(sorted(map(str, ran)))}, the plan assumes "
                  f"{big_plan.recipe.setup.precision}", flush=True)
            measured_tps = statistics.fmean(r["tokens_per_second"] for r in big_runs)
            if mfu is None and strategy == "single":
                mfu = measured_tps * big_plan.recipe.model.flops_per_token / big_plan.speed.peak_flops
                print(f"calibration: the 1-process run's MFU is {mfu:.1%} of the measured peak")
                big_plan = make_plan(recipe_args(args, strategy, "big", Path(tmp) / "cache"), device_kind="cpu",
                                     peak_flops=peaks[1], mfu=mfu)
            rows.append(compare(strategy, result, big_plan, measured_tps, calibration=strategy == "single"))
            print(f"{strategy}: done ({len(result['big'][1])} process(es))", flush=True)
    print_table(rows)
    print(f"load average after: {os.getloadavg()[0]:.2f} (2 cores shared with other agents: timings are noisy)")


def compare(strategy, result, big_plan, measured_tps, calibration: bool) -> dict:
    (small_plan, small_runs) = result["small"]
    big_runs = result["big"][1]
    measured = statistics.fmean(r["model_rss"] for r in big_runs) - statistics.fmean(r["model_rss"] for r in small_runs)
    planned = model_part(big_plan) - model_part(small_plan)
    peak = statistics.fmean(r["peak_rss"] for r in big_runs)
    return {"strategy": strategy, "processes": len(big_runs), "planned_mib": planned / 2**20,
            "measured_mib": measured / 2**20, "memory_error": measured / planned - 1,
            "planned_peak_mib": big_plan.total_bytes / 2**20, "measured_peak_mib": peak / 2**20,
            "planned_tps": big_plan.speed.tokens_per_second, "measured_tps": measured_tps,
            "tps_error": None if calibration else measured_tps / big_plan.speed.tokens_per_second - 1}


def print_table(rows: list[dict]) -> None:
    print("\n| strategy | processes | model+optimizer MiB planned | measured | error | tokens/s planned | measured | "
          "error | peak RSS MiB/process (whole process) | planned total/device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps_error = "calibration" if r["tps_error"] is None else f"{r['tps_error']:+.1%}"
        print(f"| {r['strategy']} | {r['processes']} | {r['planned_mib']:.1f} | {r['measured_mib']:.1f} | "
              f"{r['memory_error']:+.1%} | {r['planned_tps']:,.0f} | {r['measured_tps']:,.0f} | {tps_error} | "
              f"{r['measured_peak_mib']:.0f} | {r['planned_peak_mib']:.0f} |")
    print("\nMemory: big (recipe size) minus small (1 layer x 64) model, so Python/torch/Lightning/data costs "
          "cancel; resident memory after an optimizer step, mean over ranks.")


if __name__ == "__main__":
    main()
