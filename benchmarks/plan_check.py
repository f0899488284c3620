"""`lm plan` against real `lm fit` runs on this CPU: tokens/s of the default recipe as `lm plan` predicts it,
and model/optimizer memory and tokens/s per strategy.

    nice -n 5 python benchmarks/plan_check.py                     # default recipe x 2 precisions, then strategies
    nice -n 5 python benchmarks/plan_check.py --parts default --repeats 2     # default recipe only, ~10 min
    nice -n 5 python benchmarks/plan_check.py --parts strategies --strategies single --steps 6

Default recipe (`--parts default`): `experiments/wikitext2_cpu.yaml` + `experiments/data/wikitext2_offline.yaml`,
as `make train` runs it (4 x 256, context 512, batch 4, vocab 8192, Muon, EMA), once with `--trainer.precision
32-true` and once with `bf16-mixed`, `--repeats` times, interleaved: `make_plan(recipe, device_kind="cpu")`
exactly as `lm plan --device_kind cpu` runs it (matmul peak measured, the recipe's step timed by the speed
probe: lm/plan/speed_probe.py), then a real `lm fit` of `--fit-steps` steps without validation
(`--trainer.limit_val_batches 0`), whose tokens/s is what the run logs: the median over its 10-step TensorBoard
log intervals (`lm.plan.probe.logged_tokens_per_second`). Prints the CPU, the load average (1-minute, sampled
every 2 s) and the cores other processes kept busy (from /proc/stat minus this process and its children)
during the plan and during the fit, predicted and measured tokens/s, and the plan's error (predicted /
measured - 1). On a shared machine a 2-thread run slows several-fold when another job takes a core, so a pair
disturbed by other processes (over `--max-foreign` cores) is run again, up to `--attempts` times, and
`--quiet-load` waits for a quiet moment before each pair; every attempt is printed.

Strategies (`--parts strategies`):

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
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.runtime.hardware import describe_cpu  # noqa: E402
from lm.plan import make_plan  # noqa: E402
from lm.plan.devices import GIB, cpu_threads_per_process, measure_cpu_peak  # noqa: E402
from lm.plan.estimate import PRECISIONS  # noqa: E402
from lm.plan.planner import default_precision  # noqa: E402
from lm.plan.recipe import read_recipe  # noqa: E402
from lm.plan.probe import logged_tokens_per_second, measure_fit, measure_gloo, prepare_data  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
WIKITEXT_TEST = WIKITEXT.with_name("wiki.test.raw")
DEFAULT_RECIPE = ["--config", str(ROOT / "experiments/wikitext2_cpu.yaml"),
                  "--config", str(ROOT / "experiments/data/wikitext2_offline.yaml")]  # what `make train` runs here
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
    parser.add_argument("--parts", nargs="+", default=["default", "strategies"], choices=["default", "strategies"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], help="default recipe rows")
    parser.add_argument("--repeats", type=int, default=1, help="default recipe: plan + fit pairs per precision")
    parser.add_argument("--fit-steps", type=int, default=80, help="default recipe: steps of each measured lm fit")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="default recipe: before each plan + fit pair, wait (up to --max-wait s) for the 1-minute "
                             "load average to fall below this (a shared machine)")
    parser.add_argument("--max-wait", type=float, default=900)
    parser.add_argument("--max-foreign", type=float, default=0.25,
                        help="default recipe: a pair during which other processes kept more cores than this busy "
                             "is marked not quiet and run again")
    parser.add_argument("--attempts", type=int, default=3, help="default recipe: tries per pair to get a quiet one")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_OVERLAYS), choices=list(STRATEGY_OVERLAYS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-file", default=str(WIKITEXT))
    args = parser.parse_args()
    if not Path(args.train_file).is_file():
        sys.exit(f"Training text not found: {args.train_file} (pass --train-file).")
    print(f"CPU: {describe_cpu()}; load average before: {os.getloadavg()[0]:.2f}")
    if "default" in args.parts:
        check_default_recipe(args)
    if "strategies" in args.parts:
        check_strategies(args)


def default_recipe_args(precision: str, cache: Path, steps: int) -> list[str]:
    """`make train`'s recipe in `precision` for `steps` steps without validation. The offline overlay's data
    paths are relative to the project root and the run's folder is a temporary one: the same files, absolute."""
    return [*DEFAULT_RECIPE, "--trainer.precision", precision, "--data.train_files", f"[{WIKITEXT}]",
            "--data.test_files", f"[{WIKITEXT_TEST}]", "--data.cache_dir", str(cache),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--experiment", f"default-{precision}"]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have run (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (the lm fit subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Activity:
    """What else ran on the machine during a `with` block: the 1-minute load average sampled every `every`
    seconds (it lags and counts our own run: ~2 for a 2-thread run alone), and `foreign`, the cores other
    processes kept busy on average ((machine's CPU time - ours) / wall time: 0 on an otherwise idle machine)."""

    def __init__(self, every: float = 2.0) -> None:
        self.every, self.samples, self.foreign = every, [], 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "Activity":
        self.samples = [os.getloadavg()[0]]
        self._start = (time.monotonic(), busy_cpu_seconds(), own_cpu_seconds())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        wall, busy, own = (b - a for a, b in zip(self._start, (time.monotonic(), busy_cpu_seconds(), own_cpu_seconds())))
        self.foreign = max(0.0, (busy - own) / max(wall, 1e-9))

    def __str__(self) -> str:
        return (f"load {statistics.fmean(self.samples):.1f} ({min(self.samples):.1f}-{max(self.samples):.1f}), "
                f"other processes {self.foreign:.2f} cores")


def check_default_recipe(args) -> None:
    """Predicted (make_plan, as `lm plan --device_kind cpu`) against measured (`lm fit`'s logged median tokens/s)
    tokens/s of the default recipe, per precision, `--repeats` interleaved plan + fit pairs. A pair during which
    other processes kept more than `--max-foreign` cores busy is printed and run again (up to `--attempts`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        prepare_data(default_recipe_args(args.precisions[0], cache, args.fit_steps))  # tokenize before any timing
        for repeat in range(args.repeats):
            for precision in args.precisions:
                for attempt in range(1, args.attempts + 1):
                    row = plan_and_fit(args, precision, cache, Path(tmp) / f"fit-{precision}-{repeat}-{attempt}",
                                       f"{precision} #{repeat + 1}.{attempt}")
                    rows.append({**row, "repeat": repeat + 1, "attempt": attempt})
                    if row["quiet"]:
                        break
    print(f"\nDefault recipe (make train: {' '.join(Path(a).name if a.endswith('.yaml') else a for a in DEFAULT_RECIPE)}), "
          f"{describe_cpu()}; lm fit of {args.fit_steps} steps, tokens/s = median over its 10-step log intervals; "
          f"plan error = predicted / measured - 1; quiet: other processes under {args.max_foreign} cores in both")
    print("| precision | run | during plan | during fit | quiet | MFU (source) | predicted tokens/s | measured | plan error |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['repeat']}.{r['attempt']} | {r['plan_activity']} | {r['fit_activity']} | "
              f"{'yes' if r['quiet'] else 'no'} | {r['mfu']:.1%} ({r['source']}) | {r['predicted']:,.0f} | "
              f"{r['measured']:,.0f} | {r['predicted'] / r['measured'] - 1:+.1%} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}\n", flush=True)


def plan_and_fit(args, precision: str, cache: Path, workdir: Path, name: str) -> dict:
    """One pair: `make_plan` as `lm plan --device_kind cpu` (the speed probe included), then the real `lm fit`."""
    recipe = default_recipe_args(precision, cache, args.fit_steps)
    if args.quiet_load is not None:
        wait_for_quiet(args.quiet_load, args.max_wait)
    with Activity() as plan_activity:
        plan = make_plan(recipe, device_kind="cpu")
    probe = plan.probe
    detail = (f"probe {probe.steps} steps, median {probe.step_seconds * 1e3:.0f} ms "
              f"({', '.join(f'{t * 1e3:.0f}' for t in probe.step_times)} ms), MFU {plan.speed.mfu:.1%} of "
              f"{plan.speed.peak_flops / 1e9:.0f} GFLOP/s" if probe else f"no probe: {plan.probe_note}")
    print(f"[{name}] plan: {plan.speed.tokens_per_second:,.0f} tokens/s ({detail}); {plan_activity}", flush=True)
    with Activity() as fit_activity:
        measured = fit_tokens_per_second(recipe, workdir)
    print(f"[{name}] lm fit: {measured['tokens_per_second']:,.0f} tokens/s (intervals: "
          f"{', '.join(f'{r:,.0f}' for r in measured['intervals'])}); {fit_activity}", flush=True)
    return {"precision": precision, "plan_activity": str(plan_activity), "fit_activity": str(fit_activity),
            "quiet": max(plan_activity.foreign, fit_activity.foreign) <= args.max_foreign,
            "predicted": plan.speed.tokens_per_second, "measured": measured["tokens_per_second"],
            "mfu": plan.speed.mfu, "source": plan.mfu_source}


def wait_for_quiet(load: float, max_wait: float) -> None:
    """Sleep until the 1-minute load average is below `load` (other jobs on the machine), at most `max_wait` s."""
    start = time.monotonic()
    while os.getloadavg()[0] >= load and time.monotonic() - start < max_wait:
        time.sleep(5)
    print(f"waited {time.monotonic() - start:.0f} s for load < {load}: {os.getloadavg()[0]:.2f}", flush=True)


def fit_tokens_per_second(recipe: list[str], workdir: Path, timeout: float = 1800) -> dict:
    """Run `lm fit <recipe>` in `workdir` (its logs/ and checkpoints/ go there) and read its logged tokens/s."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lm", "fit", *recipe]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"lm fit failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    experiment = recipe[recipe.index("--experiment") + 1]
    return logged_tokens_per_second(max((workdir / "logs" / experiment).glob("version_*")))


def check_strategies(args) -> None:
    """Memory and tokens/s per strategy (see the module docstring)."""
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
