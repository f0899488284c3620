"""SIGKILL at three moments of a real `lm fit` process -- inside a training step, during validation, in the
middle of writing a checkpoint -- then `lm fit --ckpt_path last` ends exactly where an uninterrupted run
with the same seed ends (fp32 CPU, 1e-5). The kill lands deterministically: a test-only callback
(tests/crash_hooks.py) freezes the process at that moment and writes a marker file, then the test kills it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from lm.cli.main import main

from tests.crash_hooks import kill_when_frozen, start_frozen
from tests.helpers import tb_scalars
from tests.test_resume import MODEL, TRAINER, data_args

pytestmark = pytest.mark.slow

MAX_STEPS = 12
# moment -> (the step it freezes at, the step of the last checkpoint written before it)
KILLS = {"train_step": (10, 9), "validation": (8, 6), "checkpoint_save": (9, 6)}


def run_args(tmp_path: Path, corpus_files, experiment: str) -> list[str]:
    # Validation every 4 steps, a checkpoint (and last.ckpt) every 3: 5-batch epochs, so resumes land mid-epoch.
    return ["fit", "--experiment", experiment, *MODEL, *TRAINER, *data_args(corpus_files, tmp_path / "cache"),
            "--model.max_steps", str(MAX_STEPS), "--trainer.max_steps", str(MAX_STEPS),
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "3",
            "--checkpoint.every_n_train_steps", "3"]


def start_frozen_run(tmp_path: Path, corpus_files, moment: str) -> tuple[subprocess.Popen, Path]:
    """`lm fit` in its own process, which freezes at `moment` (tests/crash_hooks.py)."""
    marker = tmp_path / f"{moment}.reached"
    hook = ["--trainer.callbacks+=tests.crash_hooks.KillPoint", "--trainer.callbacks.init_args.moment", moment,
            "--trainer.callbacks.init_args.step", str(KILLS[moment][0]), "--trainer.callbacks.init_args.marker", str(marker)]
    return start_frozen(tmp_path, marker, ["-m", "lm", *run_args(tmp_path, corpus_files, moment), *hook]), marker


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_what_the_kill_left(ckpt_dir: Path, moment: str) -> None:
    """Every checkpoint file is whole and last.ckpt is the last one finished before the kill; a save cut
    in half left only its temporary file, which no reader opens."""
    steps = {path.name: load(path)["global_step"] for path in ckpt_dir.glob("*.ckpt")}
    assert steps["last.ckpt"] == KILLS[moment][1], steps
    partial = list(ckpt_dir.glob(".*.tmp"))
    if moment == "checkpoint_save":
        assert len(partial) == 1 and partial[0].stat().st_size > 0, partial  # killed mid-write
        with pytest.raises(Exception):
            load(partial[0])
    else:
        assert not partial


def test_sigkill_at_three_moments_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    main(run_args(tmp_path, corpus_files, "reference"))  # also prepares the token cache the others share
    reference_losses = tb_scalars(tmp_path / "logs" / "reference")["train/loss"]
    reference = load(tmp_path / "checkpoints" / "reference" / "last.ckpt")

    runs = {moment: start_frozen_run(tmp_path, corpus_files, moment) for moment in KILLS}  # frozen side by side
    for moment, (process, marker) in runs.items():
        kill_when_frozen(process, marker)
    for moment in KILLS:
        ckpt_dir = tmp_path / "checkpoints" / moment
        check_what_the_kill_left(ckpt_dir, moment)
        main([*run_args(tmp_path, corpus_files, moment), "--ckpt_path", "last"])

        final = load(ckpt_dir / "last.ckpt")
        assert final["global_step"] == MAX_STEPS
        assert not list(ckpt_dir.glob(".*.tmp"))  # the half-written temporary file was cleared at the restart
        resumed_losses = tb_scalars(tmp_path / "logs" / moment / "version_1")["train/loss"]
        last_step = max(reference_losses)
        assert resumed_losses[last_step] == pytest.approx(reference_losses[last_step], abs=1e-5), moment
        for step in resumed_losses:
            assert resumed_losses[step] == pytest.approx(reference_losses[step], abs=1e-5), (moment, step)
        for key, value in reference["state_dict"].items():
            torch.testing.assert_close(final["state_dict"][key], value, atol=1e-5, rtol=0, msg=f"{moment}: {key}")
