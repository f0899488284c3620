"""`make smoke`: the `make train` path on a step budget, then every `lm` verb on its best checkpoint.

    make smoke                                  # 32-true and bf16-mixed, side by side
    make smoke PRECISION=32-true                # one precision
    make smoke SMOKE_ARGS="--jobs 1"            # the precisions one after the other (default: side by side)
    python tests/smoke.py --precision bf16-mixed --config experiments/wikitext2_cpu.yaml \
        --config experiments/data/wikitext2_offline.yaml      # what `make smoke` runs (configs from the Makefile)

Per precision: `lm fit` of the recipe `make train` trains (same `--config` files, handed over by the
Makefile) with `--trainer.precision P` and a step budget, `lm test` of its best checkpoint (the newest
`step*.ckpt`, else `last.ckpt`, as `make train` picks it), then `lm validate`, `lm predict`,
`lm generate` (one streamed prompt; a batch of prompts), `lm eval` (non-overlapping and `--stride`, on a
slice of wiki.test.raw), `lm export` (safetensors, onnx, hf), `lm quantize` then `lm generate` and
`lm eval` of the int8 checkpoint, `lm prune`, `lm finetune fit` (SST-2, a few steps on the checkpoint as
backbone), `lm serve` (started on a free loopback port, one completion over HTTP, stopped), `lm report`
and `lm plan` of the recipe. Lightning verbs get `--trainer.precision P`; `generate` and `serve` get
`--dtype bfloat16` in the bf16 run; `eval` gets `--dtype float32` or `bfloat16` (its `auto` would follow the CPU,
not the run) and `export`, `quantize`, `prune`, `report` have no dtype.

Each verb prints one line: PASS, REFUSED (a one-line `LMError`, exit status 2) or FAIL (a traceback, an
unexpected exit status, a refusal of a verb expected to work, or missing output), with its time; a
verb whose input failed is SKIP. Its whole output is kept in logs/smoke-P-out/logs/. A summary table
ends the run; the exit status is 1 if anything failed or was skipped.

The budget holds where bf16 is emulated (a CPU without AVX-512-BF16/AMX, or oneDNN capped with
`ONEDNN_MAX_CPU_ISA=AVX2`: measured here, a 1024^2 bf16 matmul at 0.9 GFLOP/s against ~60 in fp32, and a
training step of the recipe 16-20 s against 0.65 s): the bf16 run then trains 2 steps and evaluates on
single batches, as `lm` itself decides it (`lm.modules.optimizers.fast_bf16_matmul`). Every folder a run writes is named `smoke-P*` (checkpoints/,
logs/) and is removed, and only those, when that run starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("32-true", "bf16-mixed")
DEFAULT_CONFIGS = ("experiments/wikitext2_cpu.yaml",)
EVAL_SOURCE = "../shared/data/wikitext-2-raw-v1/wiki.test.raw"
EVAL_BYTES = 16_000  # the head of the test file `lm eval` scores (~4k tokens: a few 512-token windows)
STRIDE = 256
SERVE_PROMPT = "The river"
TRACEBACK = "Traceback (most recent call last)"

# Every verb the smoke must run (tests/test_smoke.py checks the plan against this list).
REQUIRED_STEPS = (
    "fit", "test", "validate", "predict", "generate stream", "generate batch", "eval",
    "export safetensors", "export onnx", "export hf", "quantize", "generate int8", "eval int8",
    "prune", "finetune fit", "serve", "report", "plan",
)


@dataclass(frozen=True)
class Budget:
    """Steps and batches of one run: about a minute of training where the precision runs at full speed."""
    fit_steps: int
    val_every: int
    val_batches: int
    test_batches: int
    finetune_steps: int
    new_tokens: int

    @staticmethod
    def for_run(precision: str, fast_bf16: bool, fit_steps: Optional[int] = None) -> "Budget":
        if precision.startswith("bf16") and not fast_bf16:  # emulated bf16 matmuls: ~20 s per training step here
            budget = Budget(fit_steps=2, val_every=2, val_batches=1, test_batches=1, finetune_steps=2, new_tokens=12)
        else:
            budget = Budget(fit_steps=40, val_every=20, val_batches=4, test_batches=4, finetune_steps=4, new_tokens=24)
        if fit_steps:
            budget = Budget(fit_steps, max(1, fit_steps // 2), budget.val_batches, budget.test_batches,
                            budget.finetune_steps, budget.new_tokens)
        return budget


@dataclass(frozen=True)
class Step:
    """One `lm` command. `argv` may hold placeholders filled in when it runs: {best} (the fit's best
    checkpoint), {int8}, {pruned}, {out} (the run's own folder), {port} (a free loopback port)."""
    name: str                                   # e.g. "generate batch"; unique in a plan
    argv: tuple[str, ...]                       # after `lm`
    expect: tuple[str, ...] = ()                # strings the output must contain
    files: tuple[str, ...] = ()                 # files the step must leave (placeholders allowed)
    needs: tuple[str, ...] = ()                 # steps that must have passed first
    may_refuse: str = ""                        # why a one-line refusal is tolerated (it is reported, not failed)
    serve: bool = False                         # start in the background, ask one completion over HTTP, stop

    @property
    def verb(self) -> str:
        return " ".join(self.argv[:2]) if self.argv[0] == "finetune" else self.argv[0]


@dataclass
class Result:
    step: Step
    status: str                                 # PASS, REFUSED, FAIL, SKIP
    seconds: float = 0.0
    detail: str = ""
    log: Optional[Path] = None


def names(precision: str) -> dict[str, str]:
    """The experiment names of a run (each is a folder under checkpoints/ and/or logs/)."""
    base = f"smoke-{precision}"
    return {"fit": base, "test": f"{base}-test", "validate": f"{base}-validate", "predict": f"{base}-predict",
            "finetune": f"{base}-sst2", "out": f"{base}-out"}


def own_folders(precision: str) -> list[Path]:
    """Every folder a run writes to: removed (only these) when it starts."""
    n = names(precision)
    return [Path("checkpoints") / n["fit"], Path("checkpoints") / n["finetune"],
            *(Path("logs") / n[key] for key in ("fit", "test", "validate", "predict", "finetune", "out"))]


def plan(precision: str, configs: list[str], budget: Budget) -> list[Step]:
    """The verbs of one run, in order."""
    n = names(precision)
    recipe = [a for c in configs for a in ("--config", c)]
    trainer = ["--trainer.precision", precision]
    dtype = ["--dtype", "bfloat16" if precision.startswith("bf16") else "float32"]  # generate, serve: not auto
    eval_dtype = ["--dtype", "bfloat16" if precision.startswith("bf16") else "float32"]
    tokens = str(budget.new_tokens)
    ckpt = Path("checkpoints") / n["fit"]
    fit_steps = ["--trainer.max_steps", str(budget.fit_steps), "--trainer.val_check_interval", str(budget.val_every),
                 "--trainer.limit_val_batches", str(budget.val_batches)]
    eval_text = ["--text_files", "[{out}/eval.txt]", "--stride", str(STRIDE)]
    return [
        # `make train`: lm fit of the recipe, then lm test of the best checkpoint
        Step("fit", ("fit", *recipe, "--experiment", n["fit"], *trainer, *fit_steps),
             expect=("max_steps=",), files=(f"{ckpt}/last.ckpt",)),
        Step("test", ("test", *recipe, "--experiment", n["test"], "--ckpt_path", "{best}", *trainer,
                      "--trainer.limit_test_batches", str(budget.test_batches)), expect=("test/bpb",), needs=("fit",)),
        Step("validate", ("validate", *recipe, "--experiment", n["validate"], "--ckpt_path", "{best}", *trainer,
                          "--trainer.limit_val_batches", str(budget.val_batches)), expect=("val/bpb",), needs=("fit",)),
        Step("predict", ("predict", *recipe, "--experiment", n["predict"], "--ckpt_path", "{best}", *trainer,
                         "--data.prompts", '["The history of", "In 1998 ,"]', "--model.sampling.max_new_tokens", tokens,
                         "--model.sampling.temperature", "0"),
             files=(f"logs/{n['predict']}/predictions.jsonl",), needs=("fit",)),
        Step("generate stream", ("generate", "--ckpt_path", "{best}", "--prompt", " = Valkyria Chronicles = ",
                                 "--max_new_tokens", tokens, "--temperature", "0", *dtype),
             expect=("Valkyria Chronicles",), needs=("fit",)),
        Step("generate batch", ("generate", "--ckpt_path", "{best}", "--prompt", "The river", "--prompt", "A town",
                                "--prompt", "In 1998 ,", "--max_new_tokens", tokens, "--temperature", "0",
                                "--format", "jsonl", *dtype),
             expect=('"prompt": "The river"', '"prompt": "A town"', '"prompt": "In 1998 ,"'), needs=("fit",)),
        Step("eval", ("eval", "--ckpt_path", "{best}", *eval_text, *eval_dtype, "--output", "{out}/eval.json"),
             expect=("non-overlapping", f"stride {STRIDE}"), files=("{out}/eval.json",), needs=("fit",)),
        Step("export safetensors", ("export", "--ckpt_path", "{best}", "--format", "safetensors",
                                    "--output", "{out}/export-safetensors"),
             files=("{out}/export-safetensors/model.safetensors",), needs=("fit",)),
        Step("export onnx", ("export", "--ckpt_path", "{best}", "--format", "onnx", "--output", "{out}/export-onnx"),
             files=("{out}/export-onnx/model.onnx",), needs=("fit",)),
        # The default recipe (RoPE + QK-norm + ReLU²) exports as lm's own code (trust_remote_code): that transformers
        # loads it and matches lm's logits and greedy tokens is tests/test_export_hf.py's job (every variant).
        Step("export hf", ("export", "--ckpt_path", "{best}", "--format", "hf", "--output", "{out}/export-hf"),
             files=("{out}/export-hf/config.json", "{out}/export-hf/modeling_lm.py", "{out}/export-hf/README.md"),
             needs=("fit",)),
        Step("quantize", ("quantize", "--ckpt_path", "{best}", "--output", "{int8}"), files=("{int8}",), needs=("fit",)),
        Step("generate int8", ("generate", "--ckpt_path", "{int8}", "--prompt", "The river", "--prompt", "A town",
                               "--max_new_tokens", tokens, "--temperature", "0", "--format", "jsonl", *dtype),
             expect=('"prompt": "The river"',), needs=("quantize",)),
        Step("eval int8", ("eval", "--ckpt_path", "{int8}", *eval_text, *eval_dtype, "--output", "{out}/eval-int8.json"),
             expect=("non-overlapping", f"stride {STRIDE}"), files=("{out}/eval-int8.json",), needs=("quantize",)),
        Step("prune", ("prune", "--ckpt_path", "{best}", "--output", "{pruned}", "--method", "unstructured",
                       "--sparsity", "0.3"), files=("{pruned}",), needs=("fit",)),
        Step("finetune fit", ("finetune", "fit", "--config", "experiments/finetune/sst2.yaml",
                              "--model.init_args.backbone", "{best}", "--experiment", n["finetune"], *trainer,
                              "--trainer.max_steps", str(budget.finetune_steps),
                              "--trainer.val_check_interval", str(budget.finetune_steps),
                              "--trainer.limit_val_batches", str(budget.val_batches)),
             expect=("max_steps=",), files=(f"checkpoints/{n['finetune']}/last.ckpt",), needs=("fit",)),
        Step("serve", ("serve", "--ckpt_path", "{best}", "--port", "{port}", "--feedback_path", "{out}/feedback.jsonl",
                       "--max_batch_size", "4", *dtype), needs=("fit",), serve=True),
        Step("report", ("report", f"logs/{n['fit']}", "--output", "{out}/report"),
             files=("{out}/report/report.md", "{out}/report/loss.png"), needs=("fit",)),
        # this machine (its peak measured now); --mfu skips the ~30 s speed probe (a short lm fit)
        Step("plan", ("plan", *recipe, "--device_kind", "cpu", "--mfu", "0.5", *trainer,
                      "--trainer.max_steps", str(budget.fit_steps)),
             expect=("Memory per device", "wall time")),
    ]


# ---------------------------------------------------------------------------------------------- running


class Run:
    """One precision's pass over the plan."""

    def __init__(self, precision: str, configs: list[str], budget: Budget, lm: Path) -> None:
        self.precision, self.configs, self.budget, self.lm = precision, configs, budget, lm
        self.names = names(precision)
        self.out = Path("logs") / self.names["out"]
        self.logs = self.out / "logs"
        self.steps = plan(precision, configs, budget)
        self.results: dict[str, Result] = {}
        self.port: Optional[int] = None

    def best_checkpoint(self) -> str:
        """As `make train` picks it: the newest step*.ckpt (the best by val/loss), else last.ckpt."""
        folder = Path("checkpoints") / self.names["fit"]
        candidates = sorted(folder.glob("step*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        return str(candidates[0] if candidates else folder / "last.ckpt")

    def fill(self, text: str) -> str:
        values = {"out": str(self.out), "int8": f"checkpoints/{self.names['fit']}/int8.ckpt",
                  "pruned": f"checkpoints/{self.names['fit']}/pruned.ckpt", "port": str(self.port)}
        if "{best}" in text:
            values["best"] = self.best_checkpoint()
        return re.sub(r"\{(best|out|int8|pruned|port)\}", lambda m: values[m.group(1)], text)

    def prepare(self) -> None:
        for folder in own_folders(self.precision):
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            elif folder.exists():
                shutil.rmtree(folder)
        self.logs.mkdir(parents=True)
        source = Path(EVAL_SOURCE)
        if not source.is_file():
            raise SystemExit(f"smoke: {source} is missing: `lm eval` scores a slice of it (../shared/data).")
        head = source.read_bytes()[:EVAL_BYTES]
        head = head[: head.rfind(b"\n") + 1]  # whole lines
        (self.out / "eval.txt").write_bytes(head)

    def run(self) -> list[Result]:
        self.prepare()
        print(f"\n== smoke {self.precision}: {self.budget.fit_steps} training steps (validation every "
              f"{self.budget.val_every}, {self.budget.val_batches} batches), outputs in {self.out}", flush=True)
        for index, step in enumerate(self.steps, start=1):
            log = self.logs / f"{index:02d}-{step.name.replace(' ', '-')}.log"
            missing = [n for n in step.needs if self.results.get(n) is None or self.results[n].status != "PASS"]
            if missing:
                result = Result(step, "SKIP", detail=f"needs {', '.join(missing)}")
            elif step.serve:
                result = self.run_serve(step, log)
            else:
                result = self.run_command(step, log)
            self.results[step.name] = result
            print(f"[{self.precision:>10}] {result.status:<7} {step.name:<20} {result.seconds:7.1f}s"
                  f"{'  ' + result.detail if result.detail else ''}", flush=True)
        return [self.results[s.name] for s in self.steps]

    def command(self, step: Step) -> list[str]:
        return [str(self.lm), *(self.fill(a) for a in step.argv)]

    def run_command(self, step: Step, log: Path, timeout: float = 1800) -> Result:
        argv = self.command(step)
        start = time.perf_counter()
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(_quote(a) for a in argv) + "\n\n")
            handle.flush()
            try:
                process = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
                code: Optional[int] = process.returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.perf_counter() - start
        output = log.read_text(errors="replace")
        if code is None:
            return Result(step, "FAIL", seconds, f"timed out after {timeout:.0f}s (log: {log})", log)
        return self.judge(step, code, output, seconds, log)

    def judge(self, step: Step, code: int, output: str, seconds: float, log: Path) -> Result:
        if TRACEBACK in output:
            return Result(step, "FAIL", seconds, f"traceback, exit {code}: {_last_error(output)} (log: {log})", log)
        if code == 2:
            refusal = _refusal(output, step.argv[0])
            if refusal:
                if step.may_refuse:
                    return Result(step, "REFUSED", seconds, refusal, log)
                return Result(step, "FAIL", seconds, f"refused (expected to work): {refusal}", log)
        if code != 0:
            return Result(step, "FAIL", seconds, f"exit {code}: {_last_error(output)} (log: {log})", log)
        missing = [f"output without {e!r}" for e in step.expect if e not in output]
        missing += [f"no file {self.fill(f)}" for f in step.files if not Path(self.fill(f)).exists()]
        if missing:
            return Result(step, "FAIL", seconds, "; ".join(missing) + f" (log: {log})", log)
        return Result(step, "PASS", seconds, "", log)

    def run_serve(self, step: Step, log: Path, start_timeout: float = 600) -> Result:
        """Start `lm serve` in its own process group, wait for /health, POST one completion, stop it."""
        self.port = _free_port()
        argv = self.command(step)
        start = time.perf_counter()
        problem, answer = "", None
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(_quote(a) for a in argv) + "\n\n")
            handle.flush()
            server = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                base = f"http://127.0.0.1:{self.port}"
                deadline = time.monotonic() + start_timeout
                while True:
                    if server.poll() is not None:
                        problem = f"exited with status {server.returncode} before answering /health"
                        break
                    try:
                        with urllib.request.urlopen(base + "/health", timeout=5) as response:
                            if response.status == 200:
                                break
                    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                        pass
                    if time.monotonic() > deadline:
                        problem = f"/health did not answer within {start_timeout:.0f}s"
                        break
                    time.sleep(0.5)
                if not problem:
                    body = {"prompt": SERVE_PROMPT, "max_tokens": self.budget.new_tokens, "temperature": 0}
                    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                                     headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(request, timeout=300) as response:
                            answer = json.loads(response.read())
                    except urllib.error.HTTPError as error:
                        problem = f"POST /v1/completions: HTTP {error.code} {error.read()[:300]!r}"
                    except (urllib.error.URLError, OSError, ValueError) as error:
                        problem = f"POST /v1/completions: {error}"
            finally:
                _stop(server)
            handle.write(f"\n--- smoke: POST /v1/completions {SERVE_PROMPT!r} -> {json.dumps(answer)}\n")
        seconds = time.perf_counter() - start
        output = log.read_text(errors="replace")
        if TRACEBACK in output:
            return Result(step, "FAIL", seconds, f"traceback: {_last_error(output)} (log: {log})", log)
        if problem:
            refusal = _refusal(output, "serve") if server.returncode == 2 else ""
            return Result(step, "FAIL", seconds, f"{refusal or problem} (log: {log})", log)
        text = (answer or {}).get("choices", [{}])[0].get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            return Result(step, "FAIL", seconds, f"no completion text in {json.dumps(answer)[:200]} (log: {log})", log)
        return Result(step, "PASS", seconds, "", log)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _refusal(output: str, verb: str) -> str:
    """The `lm <verb>: error: ...` line of an LMError, or ''."""
    for line in output.splitlines():
        if line.startswith(f"lm {verb}: error: "):
            return line
    return ""


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=+,@-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def fast_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here (as `lm` decides it: lm.modules.optimizers.fast_bf16_matmul)."""
    import torch

    from lm.modules.optimizers import fast_bf16_matmul

    return fast_bf16_matmul(torch.device("cpu"))


def summary(runs: dict[str, list[Result]]) -> str:
    precisions = list(runs)
    rows = [[r.step.name] + [f"{runs[p][i].status} {runs[p][i].seconds:6.1f}s" for p in precisions]
            for i, r in enumerate(runs[precisions[0]])]
    rows.append(["total"] + [f"{sum(r.seconds for r in runs[p]):.0f}s" for p in precisions])
    header = ["verb"] + precisions
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {p} {r.step.name}: {r.status} {r.detail}" for p in precisions for r in runs[p]
             if r.status != "PASS"]
    return "\n".join(lines + (["", "not passed:"] + notes if notes else []))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--config", action="append", default=None,
                        help="the recipe's --config files, in order (`make smoke` passes make train's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the budget's)")
    parser.add_argument("--jobs", type=int, default=2, help="precisions run side by side (1: one after the other)")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    configs = args.config or list(DEFAULT_CONFIGS)
    lm = Path(sys.executable).parent / "lm"
    native = fast_bf16() if any(p.startswith("bf16") for p in args.precision) else True
    print(f"smoke: {' '.join(configs)}; bf16 matmuls {'in hardware' if native else 'emulated (short bf16 budget)'}")
    pending = [Run(p, configs, Budget.for_run(p, native, args.steps), lm) for p in args.precision]
    # Side by side: each run is its own `lm` processes and folders, and most verbs are bound by one core (Python
    # and Lightning start-up), so two runs take little more than the longer one on 2 cores.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs: dict[str, list[Result]] = dict(zip(args.precision, pool.map(Run.run, pending)))
    text = summary(runs)
    print("\n" + text)
    for precision in runs:
        (Path("logs") / names(precision)["out"] / "summary.txt").write_text(text + "\n")
    failed = any(r.status in ("FAIL", "SKIP") for results in runs.values() for r in results)
    print(f"\nsmoke: {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
