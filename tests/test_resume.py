"""Exact resume: `lm fit --ckpt_path last|PATH` continues a run as if it had never stopped (same global
step, LR schedule position, optimizer state, RNG state and mid-epoch data position). Kills with SIGKILL at
three moments of a run are tests/test_crash_safety.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.cli.main import main

from tests.helpers import tb_scalars, tiny_data, tiny_model_flags

# A tiny model with dropout on, so the resumed run must also get the random generators right.
MODEL = tiny_model_flags(context=16, dropout=0.1, warmup_steps=3)
TRAINER = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.log_every_n_steps", "1", "--trainer.check_val_every_n_epoch", "null",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def data_args(files, cache_dir, samples_per_epoch: int = 40) -> list[str]:
    # 40 windows / batch 8 = 5 batches per epoch.
    return tiny_data(files, cache_dir, test=False, samples_per_epoch=samples_per_epoch)


def train_losses(log_dir: Path) -> dict[int, float]:
    """step -> train/loss from the TensorBoard events under log_dir."""
    return tb_scalars(log_dir)["train/loss"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_half_stop_resume_equals_one_go(tmp_path, monkeypatch, corpus_files):
    """12 steps in one go == 6 steps, stop, `--ckpt_path last`, 6 more (resuming mid-epoch 2 of 5-batch epochs)."""
    monkeypatch.chdir(tmp_path)
    common = [*MODEL, *TRAINER, *data_args(corpus_files, tmp_path / "cache"),
              "--model.max_steps", "12",  # the LR schedule spans the whole run in all three invocations
              "--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "3"]
    main(["fit", "--experiment", "full", *common, "--trainer.max_steps", "12"])
    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "6"])
    first_half = load(tmp_path / "checkpoints" / "half" / "last.ckpt")
    assert first_half["global_step"] == 6
    loader_state = first_half["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == 1 and loader_state["batches_consumed"] == 1  # mid-epoch

    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "12", "--ckpt_path", "last"])

    full, resumed = load(tmp_path / "checkpoints/full/last.ckpt"), load(tmp_path / "checkpoints/half/last.ckpt")
    assert resumed["global_step"] == full["global_step"] == 12
    assert resumed["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"] == 12
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    exp_avg = lambda ckpt: [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]  # noqa: E731
    for a, b in zip(exp_avg(full), exp_avg(resumed)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)

    one_go = train_losses(tmp_path / "logs" / "full")
    split = {**train_losses(tmp_path / "logs" / "half" / "version_0"), **train_losses(tmp_path / "logs" / "half" / "version_1")}
    assert len(one_go) >= 12 and sorted(one_go) == sorted(split)
    for step, loss in one_go.items():
        assert split[step] == pytest.approx(loss, abs=1e-5), f"step {step}: {split[step]} != {loss}"
