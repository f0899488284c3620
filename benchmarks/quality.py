"""Quality per CPU-minute: train a recipe for a fixed wall-clock budget, score its best checkpoint on the
raw WikiText-2 test file.

    python benchmarks/quality.py                                   # the default recipe, seed 1234, 600 s
    python benchmarks/quality.py --seeds 1234 1235                 # reproducibility over two seeds
    python benchmarks/quality.py --name wd0 -- --model.weight_decay 0.0   # an ablation: extra `lm fit` flags
    python benchmarks/quality.py --precision 32-true               # what a CPU without native bf16 runs

The protocol (issue "Quality per CPU-minute"), fixed so runs compare:
- train on `wiki.valid.raw` with its last 5% held back for validation (experiments/data/wikitext2_offline.yaml),
  ByteLevelBPE vocab 8192 trained on the training text only;
- `lm fit` runs exactly as a user runs it, with `--trainer.max_time` = the budget (validation included;
  preparing the data and the final test are not counted) and `--trainer.max_steps -1`, so the recipe's
  LR schedule is stretched over the wall-clock budget (LanguageModel's time-based schedule);
- the checkpoint with the best validation loss is scored on `wiki.test.raw` as given: encoded whole with
  the checkpoint's tokenizer, non-overlapping windows of the model's context over the whole stream,
  bits per byte = total NLL / ln 2 / the file's UTF-8 byte count (`lm eval`, lm/evaluation/perplexity.py).

Prints per seed and as mean ± spread: test ppl and bpb (the network's own softmax, and for a model with a
context cache the mixture's beside it), steps, tokens seen, epochs, the validation curve,
the CPU (with or without native bf16), the precision the run used and the best checkpoint's path. Runs
write into checkpoints/ and logs/ under `--workdir` (default: the project root, like `lm fit`).

And the generation figures of the best checkpoint, so a lower bpb cannot hide worse text: the distribution
`lm generate` samples by default (the plain softmax, the default repetition penalty, temperature 0.8, top-k 50)
continues the first `--gen-prompts` article headings of the test file, `--gen-seeds` samples of
`--gen-tokens` tokens each, and greedily once (benchmarks/generation_quality.py's `measure`, the "default"
row of its table): rep4 (the share of word 4-grams repeating an earlier one of the same sample), distinct-2,
the greedy rep4, beside the test text's own rep4 / distinct-2 (pieces as long as a sample), and whether rep4
stays within generation_quality.BOUND times the text's. `--gen-prompts 0` skips them. The defaults
(16 x 3 x 150, generation_quality.py's) took ~9 s on a 4x256 checkpoint, one thread of a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation_quality import BOUND, heading_prompts, measure  # noqa: E402
from lm.errors import LMError  # noqa: E402
from lm.io.checkpoints import load_model  # noqa: E402
from lm.model import SamplingOptions  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1"
ANCHOR_BPB = 2.185  # a well-known minimal GPT, best of three recipes, same protocol and budget (issue 10)


def main() -> None:
    args, fit_flags = parse_args()
    print(f"CPU: {describe_cpu()}; load average {os.getloadavg()[0]:.2f} (others on the cores slow the run)")
    results = [run_seed(args, seed, fit_flags) for seed in args.seeds]
    print_summary(args, results)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/wikitext2_cpu.yaml", help="the recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--budget", type=int, default=600, help="training wall-clock seconds (max_time)")
    parser.add_argument("--precision", default=None, help="override the recipe's (auto) precision")
    parser.add_argument("--name", default="quality", help="experiment name prefix")
    parser.add_argument("--workdir", default=str(ROOT), help="where checkpoints/ and logs/ go")
    parser.add_argument("--test-file", default=str(WIKITEXT / "wiki.test.raw"))
    parser.add_argument("--gen-prompts", type=int, default=16,
                        help="test-file headings the best checkpoint continues for the generation figures (0: skip them)")
    parser.add_argument("--gen-seeds", type=int, default=3, help="samples per heading at temperature 0.8")
    parser.add_argument("--gen-tokens", type=int, default=150, help="new tokens per sample")
    args, extra = parser.parse_known_args()
    fit_flags = [f for f in extra if f != "--"]
    if not Path(args.test_file).is_file():
        sys.exit(f"{args.test_file} not found: the protocol needs ../shared/data/wikitext-2-raw-v1 (see its SOURCES.md).")
    if args.gen_prompts < 0 or (args.gen_prompts and (args.gen_seeds < 1 or args.gen_tokens < 1)):
        sys.exit(f"--gen-prompts must be >= 0 (0 skips the generation figures), --gen-seeds and --gen-tokens >= 1; "
                 f"got {args.gen_prompts}, {args.gen_seeds}, {args.gen_tokens}.")
    try:  # before the run, not after ten minutes of training
        heading_prompts(Path(args.test_file).read_text(encoding="utf-8"), args.gen_prompts)
    except LMError as error:
        sys.exit(f"{error} Lower --gen-prompts, or 0 to skip the generation figures.")
    return args, fit_flags


def run_seed(args: argparse.Namespace, seed: int, fit_flags: list[str]) -> dict:
    experiment = f"{args.name}_s{seed}"
    workdir = Path(args.workdir)
    run_dir = workdir / "checkpoints" / experiment
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: pick another --name (runs are never overwritten).")
    budget = time.strftime("00:%H:%M:%S", time.gmtime(args.budget))
    command = [sys.executable, "-m", "lm", "fit", "--config", str(ROOT / args.config),
               "--config", str(ROOT / "experiments" / "data" / "wikitext2_offline.yaml"),
               "--experiment", experiment, "--seed_everything", str(seed),
               "--trainer.max_time", budget, "--trainer.max_steps", "-1",
               "--trainer.enable_progress_bar", "false", *fit_flags]
    if args.precision:
        command += ["--trainer.precision", args.precision]
    print("\n$ " + " ".join(command), flush=True)
    start = time.time()
    fit = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if fit.returncode != 0:
        sys.exit(f"lm fit failed ({fit.returncode}):\n{fit.stderr[-3000:]}")
    if workdir.resolve() != ROOT:
        for folder in ("checkpoints", "logs"):
            (workdir / folder).mkdir(parents=True, exist_ok=True)
            (ROOT / folder / experiment).rename(workdir / folder / experiment)
    best = best_checkpoint(run_dir)
    result = {"seed": seed, "experiment": experiment, "best_checkpoint": str(best),
              "fit_seconds": round(time.time() - start, 1),
              "precision": used_precision(fit.stderr + fit.stdout, workdir / "logs" / experiment)}
    result.update(training_record(workdir / "logs" / experiment, best))
    result.update(test_scores(best, args.test_file))
    result.update(generation_scores(best, args.test_file, args.gen_prompts, args.gen_seeds, args.gen_tokens))
    print_run(result)
    return result


def best_checkpoint(run_dir: Path) -> Path:
    """The top-1 checkpoint by validation loss (the default ModelCheckpoint names it ...-val_loss<value>.ckpt)."""
    candidates = sorted(run_dir.glob("*val_loss*.ckpt"), key=lambda p: float(p.stem.split("val_loss")[-1]))
    if not candidates:
        sys.exit(f"No validated checkpoint in {run_dir}: did the run validate at least once?")
    return candidates[0]


def used_precision(log: str, log_dir: Path) -> str:
    """The precision the run used: lm's log line when `trainer.precision: null` chose it, else the value in
    the run's saved config (an explicit `--precision`)."""
    for line in log.splitlines():
        if "precision" in line.lower() and ("bf16" in line or "32" in line):
            return line.strip()[-160:]
    import yaml

    for config in sorted(log_dir.glob("version_*/config.yaml")):
        precision = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("precision")
        if precision is not None:
            return f"{precision} (set explicitly)"
    return "(not logged)"


def training_record(log_dir: Path, best: Path) -> dict:
    """Steps, tokens seen, epochs and the validation curve, from the run's checkpoint and its TensorBoard
    events (read as `lm report` reads them)."""
    import torch

    from lm.evaluation.run_report import find_runs, read_run

    checkpoint = torch.load(best.parent / "last.ckpt", map_location="cpu", weights_only=True)
    data = checkpoint.get("datamodule_hyper_parameters", {})
    steps = int(checkpoint["global_step"])
    tokens = steps * int(data.get("batch_size", 0)) * int(data.get("block_size", 0))
    runs = [read_run(folder, folder.name) for folder in find_runs([str(log_dir)])]
    curve = sorted((step, round(value, 4)) for run in runs for step, value, _ in run.series("val/loss"))
    return {"steps": steps, "tokens_seen": tokens, "epochs": round(checkpoint.get("epoch", 0) + 1, 1),
            "val_curve": curve}


def test_scores(best: Path, test_file: str) -> dict:
    from lm.commands.eval import evaluate

    rows = evaluate(ckpt_path=str(best), text_files=[test_file], dtype="float32")["text"]  # the reference figures
    network = next(r for r in rows if not r["context_cache"])  # the model's own softmax
    cache = next((r for r in rows if r["context_cache"]), None)  # the context cache's mixture, if it has one
    return {"test_ppl": network["ppl"], "test_bpb": network["bpb"], "test_tokens": network["tokens"],
            "test_bytes": network["bytes"], "test_cache_bpb": cache["bpb"] if cache else None}


def generation_scores(best: Path, test_file: str, prompts: int, seeds: int, tokens: int) -> dict:
    """How the best checkpoint's text reads as `lm generate` samples it by default, beside the test text's own
    figures (generation_quality.measure's "default" row); {} when `prompts` is 0. A model whose context cannot
    hold a heading plus `tokens` new tokens (an ablation with a short context) samples as many as fit,
    "gen_tokens" says how many: the text's pieces are cut as long, so the ratio still compares like with like.
    A failure is reported in "gen_error" rather than raised: the run's training and scores are worth keeping."""
    if not prompts:
        return {}
    start = time.perf_counter()
    model, tokenizer = load_model(best)
    text = Path(test_file).read_text(encoding="utf-8")
    longest_prompt = max(len(tokenizer.encode(prompt)) for prompt in heading_prompts(text, prompts))
    tokens = min(tokens, model.config.max_position_embeddings - longest_prompt)
    try:
        figures = measure(model, tokenizer, text, prompts=prompts, seeds=seeds, max_new_tokens=tokens,
                          rows=("default",))
    except LMError as error:
        return {"gen_error": str(error)}
    default, reference = figures["rows"]["default"], figures["reference"]
    return {"gen_rep4": default["sampled"]["repeated_4gram_share"], "gen_distinct_2": default["sampled"]["distinct_2"],
            "gen_greedy_rep4": default["greedy"]["repeated_4gram_share"],
            "gen_text_rep4": reference["repeated_4gram_share"], "gen_text_distinct_2": reference["distinct_2"],
            "gen_rep4_ratio": figures["rep4_ratio"], "gen_within_bound": figures["within_bound"],
            "gen_tokens": tokens, "gen_example": default["example"][:600],
            "gen_seconds": round(time.perf_counter() - start, 1)}


def generation_settings(args: argparse.Namespace, tokens: int) -> str:
    options = SamplingOptions()  # what `lm generate` samples with unless told otherwise
    return (f"{args.gen_prompts} headings x {args.gen_seeds} seeds x {tokens} tokens; lm generate's defaults: "
            f"temperature {options.temperature:g}, top-k {options.top_k}, "
            f"repetition penalty {options.repetition_penalty:g}")


def print_run(r: dict) -> None:
    cache = f", with the context cache {r['test_cache_bpb']:.4f}" if r.get("test_cache_bpb") is not None else ""
    print(f"seed {r['seed']}: test ppl {r['test_ppl']:.1f}, bpb {r['test_bpb']:.4f}{cache} | {r['steps']} steps, "
          f"{r['tokens_seen'] / 1e6:.2f}M tokens seen, epoch {r['epochs']}, fit {r['fit_seconds']} s wall "
          f"(incl. data preparation and start-up)\n  precision: {r['precision']}\n  best checkpoint: {r['best_checkpoint']}")
    print("  validation loss by step: " + ", ".join(f"{s}: {v}" for s, v in r["val_curve"]))
    if "gen_error" in r:
        print(f"  generation figures: none ({r['gen_error']})")
    if "gen_rep4" in r:
        print(f"  generation (the default sampling, {r['gen_tokens']} tokens): rep4 {r['gen_rep4']:.4f} "
              f"against the test text's {r['gen_text_rep4']:.4f} ({r['gen_rep4_ratio']:.2f}x, bound {BOUND}x "
              f"{'met' if r['gen_within_bound'] else 'NOT met'}), distinct-2 {r['gen_distinct_2']:.3f} "
              f"(text {r['gen_text_distinct_2']:.3f}), greedy rep4 {r['gen_greedy_rep4']:.3f}; {r['gen_seconds']} s")


def print_summary(args: argparse.Namespace, results: list[dict]) -> None:
    bpbs = [r["test_bpb"] for r in results]
    mean = statistics.mean(bpbs)
    spread = (max(bpbs) - min(bpbs)) / mean * 100 if len(bpbs) > 1 else 0.0
    print(f"\n{args.config} {' '.join(sys.argv[1:])}\nCPU: {describe_cpu()}")
    print(f"test bpb over seeds {args.seeds}: mean {mean:.4f} (spread {spread:.1f}%), "
          f"ppl mean {statistics.mean(r['test_ppl'] for r in results):.1f}; anchor {ANCHOR_BPB} "
          f"({(mean / ANCHOR_BPB - 1) * 100:+.1f}%)")
    cached = [r["test_cache_bpb"] for r in results if r.get("test_cache_bpb") is not None]
    if cached:
        cache_mean = statistics.mean(cached)
        print(f"with the context cache: mean {cache_mean:.4f} (anchor {(cache_mean / ANCHOR_BPB - 1) * 100:+.1f}%)")
    generated = [r for r in results if "gen_rep4" in r]
    if generated:
        def mean_of(key: str) -> float:
            return statistics.mean(r[key] for r in generated)

        settings = generation_settings(args, min(r["gen_tokens"] for r in generated))
        print(f"generation ({settings}): rep4 mean {mean_of('gen_rep4'):.4f} against the test text's "
              f"{mean_of('gen_text_rep4'):.4f} ({mean_of('gen_rep4_ratio'):.2f}x; bound {BOUND}x met in "
              f"{sum(r['gen_within_bound'] for r in generated)} of {len(generated)} runs), distinct-2 mean "
              f"{mean_of('gen_distinct_2'):.3f} (text {mean_of('gen_text_distinct_2'):.3f}), greedy rep4 mean "
              f"{mean_of('gen_greedy_rep4'):.3f}")
    out = Path(args.workdir) / "logs" / f"{args.name}_quality.json"
    record = {"cpu": describe_cpu(), "argv": sys.argv[1:], "runs": results}
    if generated:
        record["generation"] = settings
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
