"""`make smoke` (tests/smoke.py) without running it: its plan names every verb, each called the way the
smoke promises (precision flags, the best checkpoint, the int8 checkpoint, ...), its verdicts are right,
and the Makefile and CI run it on make train's recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lm.cli.main import FUNCTION_VERBS, LIGHTNING_VERBS
from tests import smoke
from tests.helpers import REPO_ROOT

CONFIGS = ["experiments/wikitext2_cpu.yaml", "experiments/data/wikitext2_offline.yaml"]


def _plan(precision: str, fast_bf16: bool = True) -> dict[str, smoke.Step]:
    steps = smoke.plan(precision, CONFIGS, smoke.Budget.for_run(precision, fast_bf16))
    by_name = {step.name: step for step in steps}
    assert len(by_name) == len(steps), "step names must be unique"
    return by_name


def _value(step: smoke.Step, flag: str) -> str:
    return step.argv[step.argv.index(flag) + 1]


@pytest.mark.parametrize("precision", smoke.PRECISIONS)
def test_plan_runs_every_verb_in_order(precision):
    steps = _plan(precision)
    assert set(smoke.REQUIRED_STEPS) <= set(steps), f"missing: {set(smoke.REQUIRED_STEPS) - set(steps)}"
    assert list(steps)[:2] == ["fit", "test"]  # make train's two steps come first
    for step in steps.values():
        assert step.argv[0] in LIGHTNING_VERBS + tuple(FUNCTION_VERBS) + ("finetune",), step
        assert all(need in steps and list(steps).index(need) < list(steps).index(step.name) for need in step.needs)
    assert {"fit", "validate", "test", "predict", "eval", "generate", "export", "quantize", "prune", "finetune fit",
            "serve", "report", "plan"} <= {step.verb for step in steps.values()}


@pytest.mark.parametrize("precision", smoke.PRECISIONS)
def test_each_verb_is_called_as_promised(precision):
    steps = _plan(precision)
    n = smoke.names(precision)
    recipe = tuple(a for c in CONFIGS for a in ("--config", c))
    fit = steps["fit"]
    assert fit.argv[1:1 + len(recipe)] == recipe and _value(fit, "--experiment") == n["fit"]
    assert int(_value(fit, "--trainer.max_steps")) > 0 and "--trainer.limit_val_batches" in fit.argv
    for name in ("fit", "test", "validate", "predict", "finetune fit", "plan"):  # Lightning verbs and the plan
        assert _value(steps[name], "--trainer.precision") == precision, name
    for name in ("test", "validate", "predict"):
        assert steps[name].argv[1:1 + len(recipe)] == recipe and _value(steps[name], "--ckpt_path") == "{best}"
    assert "--trainer.limit_test_batches" in steps["test"].argv
    dtype = "bfloat16" if precision.startswith("bf16") else "float32"  # given: their default (auto) follows the CPU
    for name in ("generate stream", "generate batch", "generate int8", "serve"):
        assert _value(steps[name], "--dtype") == dtype, name
    assert steps["generate stream"].argv.count("--prompt") == 1 and "--stream" not in steps["generate stream"].argv
    assert steps["generate batch"].argv.count("--prompt") >= 2
    for name, ckpt in (("eval", "{best}"), ("eval int8", "{int8}")):
        assert _value(steps[name], "--ckpt_path") == ckpt and "--stride" in steps[name].argv
        assert {"non-overlapping", f"stride {smoke.STRIDE}"} <= set(steps[name].expect)
    assert {_value(steps[f"export {f}"], "--format") for f in ("safetensors", "onnx", "hf")} == {"safetensors", "onnx", "hf"}
    assert _value(steps["quantize"], "--output") == "{int8}" and _value(steps["generate int8"], "--ckpt_path") == "{int8}"
    assert _value(steps["prune"], "--ckpt_path") == "{best}"
    finetune = steps["finetune fit"]
    assert finetune.argv[:4] == ("finetune", "fit", "--config", "experiments/finetune/sst2.yaml")
    assert _value(finetune, "--model.init_args.backbone") == "{best}" and "--trainer.max_steps" in finetune.argv
    assert steps["serve"].serve and _value(steps["serve"], "--port") == "{port}"
    assert steps["report"].argv[1] == f"logs/{n['fit']}"
    assert steps["plan"].argv[1:1 + len(recipe)] == recipe
    refusing = [name for name, step in steps.items() if step.may_refuse]
    assert refusing == [], "every verb is expected to work (hf: the default recipe exports as lm's own code)"


def test_emulated_bf16_gets_a_shorter_budget():
    fast, emulated = smoke.Budget.for_run("bf16-mixed", True), smoke.Budget.for_run("bf16-mixed", False)
    assert smoke.Budget.for_run("32-true", False) == fast
    assert emulated.fit_steps < fast.fit_steps and emulated.val_batches <= fast.val_batches
    assert smoke.Budget.for_run("32-true", True, fit_steps=6).fit_steps == 6


@pytest.mark.parametrize("precision", smoke.PRECISIONS)
def test_a_run_removes_only_its_own_folders(precision):
    folders = smoke.own_folders(precision)
    assert all(f.parts[0] in ("checkpoints", "logs") and f.parts[1].startswith(f"smoke-{precision}") for f in folders)
    other = [p for p in smoke.PRECISIONS if p != precision][0]
    assert not set(folders) & set(smoke.own_folders(other))
    steps = smoke.plan(precision, CONFIGS, smoke.Budget.for_run(precision, True))
    written = [_value(s, "--experiment") for s in steps if "--experiment" in s.argv]
    assert {Path("logs") / name for name in written} <= set(folders)


def test_verdicts(tmp_path):
    run = smoke.Run("32-true", CONFIGS, smoke.Budget.for_run("32-true", True), Path("lm"))
    step, log = smoke.Step("export hf", ("export", "--format", "hf")), tmp_path / "x.log"
    refusal = "lm export: error: This model has no Hugging Face counterpart.\n(set LM_DEBUG=1 to see the traceback)\n"
    assert run.judge(step, 0, "done", 1.0, log).status == "PASS"
    assert run.judge(step, 2, refusal, 1.0, log).status == "FAIL"  # expected to work: a refusal is a failure
    tolerated = smoke.Step("export hf", ("export",), may_refuse="not supported yet")
    assert run.judge(tolerated, 2, refusal, 1.0, log).status == "REFUSED"
    traceback = "Traceback (most recent call last):\n  File ...\nRuntimeError: boom\n"
    assert run.judge(tolerated, 1, traceback, 1.0, log).status == "FAIL"
    assert "RuntimeError: boom" in run.judge(step, 0, traceback, 1.0, log).detail  # a traceback fails even with 0
    assert run.judge(step, 1, "killed", 1.0, log).status == "FAIL"
    assert run.judge(smoke.Step("eval", ("eval",), expect=("stride 256",)), 0, "non-overlapping", 1.0, log).status == "FAIL"
    missing = smoke.Step("quantize", ("quantize",), files=(str(tmp_path / "int8.ckpt"),))
    assert run.judge(missing, 0, "", 1.0, log).status == "FAIL"


def test_fit_command_parses_as_lm_fit_does(monkeypatch):
    from lm.cli.lightning_cli import parse_recipe

    monkeypatch.chdir(REPO_ROOT)
    fit = _plan("bf16-mixed")["fit"]
    config = parse_recipe([smoke.Run("bf16-mixed", CONFIGS, smoke.Budget.for_run("bf16-mixed", True),
                                     Path("lm")).fill(a) for a in fit.argv[1:]])
    assert config.trainer.precision == "bf16-mixed" and config.trainer.max_steps == int(_value(fit, "--trainer.max_steps"))
    assert config.model.init_args.config.context_cache  # the recipe's own model, unchanged


def test_makefile_and_ci_run_the_smoke_on_make_trains_recipe():
    makefile = (REPO_ROOT / "Makefile").read_text()
    train = re.search(r"^train:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    recipe = re.search(r"^smoke:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "lm fit --config $(CONFIG) $(DATA_CONFIG)" in train
    assert "tests/smoke.py --precision $(PRECISION) --config $(CONFIG) $(DATA_CONFIG)" in recipe
    assert re.search(r"^PRECISION \?= 32-true bf16-mixed$", makefile, re.M)
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test .*\n(?:.*\n)*^make smoke\b", ci, re.M), "CI runs the smoke after the tests"


@pytest.mark.parametrize("test_status, smoke_status, expected", [
    (0, 0, 0), (1, 0, 1), (0, 1, 1), (5, 0, 5), (1, 2, 1), (0, 2, 2)])
def test_ci_fails_when_the_tests_or_the_smoke_fail(tmp_path, test_status, smoke_status, expected):
    """.ci/run with a fake `make`: the smoke runs even after failed tests, and either failure fails CI."""
    import os
    import shutil
    import subprocess

    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO_ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "make"
    fake.write_text("#!/bin/sh\necho \"make $1\" >> calls.txt\ncase \"$1\" in test) exit $TEST_STATUS;; "
                    "smoke) exit $SMOKE_STATUS;; esac\nexit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TEST_STATUS": str(test_status),
           "SMOKE_STATUS": str(smoke_status)}
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert result.returncode == expected, result.stdout + result.stderr
    assert (tmp_path / "calls.txt").read_text().split("\n")[1:3] == ["make test", "make smoke"]
