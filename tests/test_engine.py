"""The training engine's overlays (experiments/trainer/*.yaml): multi-process data parallelism (DDP,
FSDP2) and gradient accumulation give the loss curve of one process with the same global batch;
an FSDP2 checkpoint reloads into a plain process; compiled models save plain parameter names; the
GPU-only overlays resolve to the intended strategy objects."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lm.cli.main import main

from tests.helpers import REPO_ROOT, tb_scalars, tiny_data, tiny_model_flags
TRAINER_DIR = REPO_ROOT / "experiments" / "trainer"
STEPS = 5


class LossRecorder(Callback):
    """Appends every micro-batch's training loss (as Lightning scaled it for accumulation) of this rank to
    ./losses.rank<R>.jsonl, plus whether the parameters are FSDP2 DTensors. Used by the subprocess runs below."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.tensor import DTensor

        param = next(pl_module.model.parameters())
        row = {"batch": trainer.fit_loop.total_batch_idx, "loss": outputs["loss"].item(),
               "dtensor": isinstance(param, DTensor), "local_numel": param.to_local().numel()
               if isinstance(param, DTensor) else param.numel(), "numel": param.numel()}
        with open(f"losses.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def run_args(files, cache_dir, batch_size: int) -> list[str]:
    return [
        *tiny_model_flags(context=16, dropout=0.0),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", str(STEPS), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.gradient_clip_val", "1.0",
        "--trainer.callbacks+=tests.test_engine.LossRecorder",
        *tiny_data(files, cache_dir, test=False, batch_size=batch_size, samples_per_epoch=80), "--experiment", "run",
    ]


def step_losses(workdir: Path, accumulate: int = 1) -> list[float]:
    """Loss of each optimizer step: the mean over ranks of the sum over its (scaled) micro-batches."""
    per_rank = []
    for path in sorted(workdir.glob("losses.rank*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        steps: dict[int, float] = {}
        for row in rows:
            steps[row["batch"] // accumulate] = steps.get(row["batch"] // accumulate, 0.0) + row["loss"]
        per_rank.append([steps[i] for i in sorted(steps)])
    assert per_rank, f"no losses recorded in {workdir}"
    return [sum(values) / len(values) for values in zip(*per_rank)]


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    return tb_scalars(log_dir).get(tag, {})


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """Five runs of the same 5 steps on the same global batch of 8 windows, launched together:
    1 process x batch 8 | DDP 2 x 4 | FSDP2 2 x 4 | DDP 2 x 4 with the context cache | 1 process x 4 x
    accumulate 2."""
    from tests.conftest import make_corpus

    root = tmp_path_factory.mktemp("engine")
    files = {}
    for split, (n_docs, seed) in {"train": (60, 0), "valid": (8, 1)}.items():
        files[split] = root / f"wiki.{split}.raw"
        files[split].write_text(make_corpus(n_docs, seed), encoding="utf-8")
    # Tokenize once, so the concurrent runs only read the cache.
    from lm.data import TextDataModule

    TextDataModule(train_files=[str(files["train"])], val_files=[str(files["valid"])], vocab_size=300, block_size=16,
                   cache_dir=str(root / "cache")).prepare_data()
    runs = {
        "single": (8, ["--trainer.devices", "1"]),
        "ddp": (4, ["--config", str(TRAINER_DIR / "ddp.yaml")]),
        "fsdp2": (4, ["--config", str(TRAINER_DIR / "fsdp2_cpu.yaml")]),
        "ddp_cache": (4, ["--config", str(TRAINER_DIR / "ddp.yaml"), "--model.config.context_cache", "true"]),
        "accumulate": (4, ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2",
                           "--trainer.val_check_interval", str(2 * STEPS)]),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    processes = {}
    for name, (batch_size, extra) in runs.items():
        workdir = root / name
        workdir.mkdir()
        # Overlays first, as the README runs them: fsdp2_cpu.yaml replaces the callback list (it drops the
        # recipe's EMA), so the flags that add this test's LossRecorder come after it.
        command = [sys.executable, "-m", "lm", "fit", *extra, *run_args(files, root / "cache", batch_size)]
        processes[name] = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True)
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    return root, files


def test_ddp_two_processes_match_one_process_with_double_batch(parallel_runs):
    root, files = parallel_runs
    single, ddp = step_losses(root / "single"), step_losses(root / "ddp")
    assert len(single) == len(ddp) == STEPS
    assert single[-1] < single[0]
    for step, (a, b) in enumerate(zip(single, ddp)):
        assert b == pytest.approx(a, abs=1e-4), f"step {step}: ddp {b} vs single {a}"
    # Validation under DDP: every window counted once (no repeats padding the shorter rank), so the
    # token-weighted val/loss equals the single process's. An odd window count makes padding necessary.
    from lm.data import TextDataModule

    data = TextDataModule(train_files=[str(files["train"])], val_files=[str(files["valid"])], vocab_size=300,
                          block_size=16, cache_dir=str(root / "cache"))
    data.prepare_data()
    data.setup("fit")
    assert len(data.val_dataset) % 2 == 1, "the fixture's validation split must give an odd number of windows"
    single_val, ddp_val = scalars(root / "single" / "logs", "val/loss"), scalars(root / "ddp" / "logs", "val/loss")
    assert ddp_val[STEPS - 1] == pytest.approx(single_val[STEPS - 1], abs=1e-4)
    # The context cache's calibration under DDP: the grid is summed over both ranks, so the softmax alone
    # scores what the single process scored, and the calibrated loss can only be lower.
    cache_plain = scalars(root / "ddp_cache" / "logs", "val/loss")[STEPS - 1]
    assert cache_plain == pytest.approx(single_val[STEPS - 1], abs=1e-4)
    assert scalars(root / "ddp_cache" / "logs", "val/cache_loss")[STEPS - 1] <= cache_plain + 1e-6
    # Effective batch in tokens: 2 ranks x 4 windows x 16 tokens = 1 x 8 x 16.
    for name in ("single", "ddp"):
        assert set(scalars(root / name / "logs", "train/tokens_per_step").values()) == {128.0}
        assert scalars(root / name / "logs", "train/tokens_seen")[STEPS - 1] == 128.0 * STEPS


def test_gradient_accumulation_matches_the_full_batch(parallel_runs):
    root, _ = parallel_runs
    single, accumulated = step_losses(root / "single"), step_losses(root / "accumulate", accumulate=2)
    assert len(accumulated) == STEPS
    for step, (a, b) in enumerate(zip(single, accumulated)):
        assert b == pytest.approx(a, abs=1e-4), f"step {step}: accumulate {b} vs single {a}"
    tokens_per_step = scalars(root / "accumulate" / "logs", "train/tokens_per_step")
    assert set(tokens_per_step.values()) == {128.0}  # 4 windows x 16 tokens x 2 micro-batches


def test_fsdp2_trains_sharded_and_its_checkpoint_reloads_in_one_process(parallel_runs, monkeypatch):
    root, files = parallel_runs
    rows = [json.loads(line) for line in (root / "fsdp2" / "losses.rank0.jsonl").read_text().splitlines()]
    assert rows[0]["dtensor"] and rows[0]["local_numel"] < rows[0]["numel"]  # really sharded over 2 ranks
    single, fsdp2 = step_losses(root / "single"), step_losses(root / "fsdp2")
    for step, (a, b) in enumerate(zip(single, fsdp2)):
        assert b == pytest.approx(a, abs=1e-4), f"step {step}: fsdp2 {b} vs single {a}"

    # save_distributed_checkpoint: false -> an ordinary file with plain parameter names ...
    checkpoint_path = root / "fsdp2" / "checkpoints" / "run" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS and "model.embed_tokens.weight" in checkpoint["state_dict"]
    reference = torch.load(root / "single" / "checkpoints" / "run" / "last.ckpt", map_location="cpu",
                           weights_only=True)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value, atol=1e-4, rtol=0, msg=key)
    # ... that `lm validate` reloads in a single plain process, giving the single-process run's val loss.
    monkeypatch.chdir(root / "fsdp2")
    main(["validate", "--experiment", "reload", "--ckpt_path", str(checkpoint_path), "--trainer.accelerator", "cpu",
          "--trainer.devices", "1", "--data.val_files", f"[{files['valid']}]", "--data.vocab_size", "300",
          "--data.batch_size", "8", "--data.cache_dir", str(root / "cache"),
          "--trainer.enable_progress_bar", "false"])
    reloaded = scalars(root / "fsdp2" / "logs" / "reload", "val/loss")
    single_val = scalars(root / "single" / "logs", "val/loss")
    assert list(reloaded.values())[-1] == pytest.approx(single_val[STEPS - 1], abs=1e-4)


def test_compiled_model_saves_and_loads_plain_parameter_names():
    from lm.model import GPTConfig
    from lm.modules import LanguageModel

    config = GPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16)
    compiled = LanguageModel(config, compile=True)
    compiled.configure_model()  # compiles in place (lazily: nothing is traced until the first forward)
    assert compiled._compiled and compiled.model._compiled_call_impl is not None
    plain = LanguageModel(config)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." in saved names
    plain.load_state_dict(compiled.state_dict())


def resolved(*overlays: str) -> dict:
    configs = [arg for name in overlays for arg in ("--config", str(TRAINER_DIR / name))]
    result = subprocess.run([sys.executable, "-m", "lm", "fit", "--config", "experiments/wikitext2_cpu.yaml", *configs,
                             "--print_config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


def test_overlays_set_what_they_say():
    expected = {
        "precision_32.yaml": {"precision": "32-true"}, "bf16_mixed.yaml": {"precision": "bf16-mixed"},
        "fp16_mixed.yaml": {"precision": "16-mixed"}, "bf16_true.yaml": {"precision": "bf16-true"},
        "accumulate.yaml": {"accumulate_grad_batches": 4, "gradient_clip_val": 1.0},
        "ddp.yaml": {"strategy": "ddp", "devices": 2},
        "multinode.yaml": {"strategy": "ddp", "num_nodes": 2, "devices": 8, "accelerator": "gpu"},
    }
    for name, fields in expected.items():
        trainer = yaml.safe_load((TRAINER_DIR / name).read_text())["trainer"]
        assert {k: trainer[k] for k in fields} == fields, name
    assert yaml.safe_load((TRAINER_DIR / "compile.yaml").read_text())["model"]["compile"] is True
    assert yaml.safe_load((TRAINER_DIR / "checkpoint_every.yaml").read_text())["checkpoint"]["every_n_train_steps"] > 0


def test_fsdp_overlay_builds_a_block_wrapped_sharded_strategy():
    """fsdp.yaml cannot run here (FSDPStrategy needs GPUs), but its strategy must build as intended."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lm.model.layers import Block

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    build = lambda name: parser.instantiate(  # noqa: E731
        parser.parse_object({"strategy": yaml.safe_load((TRAINER_DIR / name).read_text())["trainer"]["strategy"]})
    ).strategy
    fsdp = build("fsdp.yaml")
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "sharded"
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    fsdp2 = build("fsdp2_cpu.yaml")
    assert isinstance(fsdp2, ModelParallelStrategy) and fsdp2._data_parallel_size == 2


@pytest.mark.parametrize("overlay", ["bf16_mixed.yaml", "bf16_true.yaml"])
def test_bf16_overlays_train_and_checkpoint(overlay, tmp_path, monkeypatch, corpus_files):
    """The bf16 overlays train on CPU (native bf16 or emulated on AVX2-only CPUs): the loss goes down,
    stays finite, and the checkpoint reloads for validation in the same precision."""
    from tests.helpers import TINY_MODEL, TINY_TRAINER, scalar_tags, tiny_data

    monkeypatch.chdir(tmp_path)
    data = tiny_data(corpus_files, tmp_path / "cache")
    main(["fit", "--experiment", "bf16", "--config", str(TRAINER_DIR / overlay), *TINY_MODEL, *TINY_TRAINER, *data])
    losses = scalar_tags(tmp_path / "logs" / "bf16")["train/loss"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    checkpoint = torch.load(tmp_path / "checkpoints" / "bf16" / "last.ckpt", map_location="cpu", weights_only=True)
    dtype = torch.bfloat16 if overlay == "bf16_true.yaml" else torch.float32  # bf16-mixed keeps fp32 weights
    assert checkpoint["state_dict"]["model.layers.0.mlp.up_proj.weight"].dtype == dtype
    main(["validate", "--experiment", "bf16_eval", "--config", str(TRAINER_DIR / overlay),
          "--ckpt_path", str(tmp_path / "checkpoints" / "bf16" / "last.ckpt"), *TINY_TRAINER[:4], *data])
    assert math.isfinite(scalar_tags(tmp_path / "logs" / "bf16_eval")["val/loss"][-1])
