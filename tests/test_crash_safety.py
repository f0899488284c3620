"""A real `lm fit` process stopped at three moments -- inside a training step, during validation, in the middle
of writing a checkpoint -- then `lm fit --ckpt_path last` ends exactly where an uninterrupted run with the
same seed ends (fp32 CPU, 1e-5). The signal lands deterministically: a test-only callback
(tests/crash_hooks.py) freezes the process at that moment and writes a marker file, then the test signals it.

- SIGKILL: nothing runs after it; the newest whole checkpoint is the one to resume from.
- SIGTERM (a preemption): the run finishes the step (and a validation or save in progress), writes last.ckpt
  at that boundary, prints one line saying how to resume, and exits 143 (lm/callbacks/preemption.py); also
  in an epoch's last step, where it stops one step later, and after SLURM's requeue signal (SIGUSR1)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lm.callbacks import PREEMPTED_EXIT_STATUS
from lm.cli.main import main

from tests.crash_hooks import kill_when_frozen, signal_when_frozen, start_frozen
from tests.helpers import tb_scalars
from tests.test_resume import MODEL, TRAINER, data_args

pytestmark = pytest.mark.slow

MAX_STEPS = 12
# Validation every 4 steps, a checkpoint (and last.ckpt) every 3.
# moment -> (the step it freezes at, the step of last.ckpt after a SIGKILL there)
KILLS = {"train_step": (10, 9), "validation": (8, 6), "checkpoint_save": (9, 6)}
# (moment, the step it freezes at, the step of last.ckpt after a SIGTERM there)
SIGTERMS = [
    ("train_step", 10, 11),  # the 11th step (global_step 10 while it runs) is finished
    ("validation", 8, 8),  # the validation after step 8 runs to its end
    ("checkpoint_save", 9, 9),  # the save at step 9 is written to its end
    ("train_step", 4, 6),  # the 5th step ends an epoch: the run stops after the next epoch's first step
]


def run_args(tmp_path: Path, corpus_files, experiment: str) -> list[str]:
    # 5-batch epochs, so resumes land mid-epoch.
    return ["fit", "--experiment", experiment, *MODEL, *TRAINER, *data_args(corpus_files, tmp_path / "cache"),
            "--model.max_steps", str(MAX_STEPS), "--trainer.max_steps", str(MAX_STEPS),
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "3",
            "--checkpoint.every_n_train_steps", "3"]


def start_frozen_run(tmp_path: Path, corpus_files, moment: str, step: int, experiment: str,
                     env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`lm fit` in its own process, which freezes at `moment` of `step` (tests/crash_hooks.py)."""
    marker = tmp_path / f"{experiment}.reached"
    hook = ["--trainer.callbacks+=tests.crash_hooks.KillPoint", "--trainer.callbacks.init_args.moment", moment,
            "--trainer.callbacks.init_args.step", str(step), "--trainer.callbacks.init_args.marker", str(marker)]
    code = ["-m", "lm", *run_args(tmp_path, corpus_files, experiment), *hook]
    return start_frozen(tmp_path, marker, code, env), marker


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_reference(tmp_path: Path, corpus_files) -> tuple[dict[str, dict[int, float]], dict]:
    """The uninterrupted run (which also prepares the token cache the others share): its scalars and last.ckpt."""
    main(run_args(tmp_path, corpus_files, "reference"))
    return tb_scalars(tmp_path / "logs" / "reference"), load(tmp_path / "checkpoints" / "reference" / "last.ckpt")


def resume_and_compare(tmp_path: Path, corpus_files, experiment: str, reference_scalars: dict, reference: dict) -> None:
    """`lm fit --ckpt_path last` ends at the reference's step, weights and train losses; the losses of every
    version together (before and after the stop) are the reference's, step for step."""
    ckpt_dir = tmp_path / "checkpoints" / experiment
    main([*run_args(tmp_path, corpus_files, experiment), "--ckpt_path", "last"])
    final = load(ckpt_dir / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    assert not list(ckpt_dir.glob(".*.tmp"))  # a half-written temporary file was cleared at the restart
    resumed_losses = tb_scalars(tmp_path / "logs" / experiment / "version_1")["train/loss"]
    reference_losses = reference_scalars["train/loss"]
    assert max(resumed_losses) == max(reference_losses)  # the resumed run logged to the last step
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(reference_losses[step], abs=1e-5), (experiment, step)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, atol=1e-5, rtol=0, msg=f"{experiment}: {key}")


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
    reference_scalars, reference = run_reference(tmp_path, corpus_files)
    runs = {moment: start_frozen_run(tmp_path, corpus_files, moment, step, moment)  # frozen side by side
            for moment, (step, _) in KILLS.items()}
    for moment, (process, marker) in runs.items():
        kill_when_frozen(process, marker)
    for moment in KILLS:
        check_what_the_kill_left(tmp_path / "checkpoints" / moment, moment)
        resume_and_compare(tmp_path, corpus_files, moment, reference_scalars, reference)


def check_what_the_sigterm_left(tmp_path: Path, experiment: str, moment: str, step: int, returncode: int,
                                output: str) -> None:
    """Exit status 143, one line saying how to resume, last.ckpt at the step the run finished, every checkpoint
    whole (the save the signal landed in was finished) and no temporary file left."""
    ckpt_dir = tmp_path / "checkpoints" / experiment
    assert returncode == PREEMPTED_EXIT_STATUS == 128 + signal.SIGTERM, output
    assert [line for line in output.splitlines() if "preempted" in line] == [
        f"lm fit: preempted by SIGTERM: saved {ckpt_dir.resolve() / 'last.ckpt'} at step {step}. Resume with the "
        f"same command and --ckpt_path last (lm fit ... --ckpt_path last); exit status 143."], output
    assert "Traceback" not in output, output
    steps = {path.name: load(path)["global_step"] for path in ckpt_dir.glob("*.ckpt")}
    assert steps["last.ckpt"] == step, steps
    if moment == "checkpoint_save":  # the file being written when the signal came is whole
        assert any(name.startswith(f"step{step:06d}") for name in steps), steps
    assert not list(ckpt_dir.glob(".*.tmp"))


def test_sigterm_saves_a_last_ckpt_that_resumes_exactly_and_exits_143(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    reference_scalars, reference = run_reference(tmp_path, corpus_files)
    runs = {(moment, frozen_at, saved_at): start_frozen_run(tmp_path, corpus_files, moment, frozen_at,
                                                            f"sigterm_{moment}_{frozen_at}")
            for moment, frozen_at, saved_at in SIGTERMS}
    for (moment, frozen_at, saved_at), (process, marker) in runs.items():
        returncode, output = signal_when_frozen(process, marker, signal.SIGTERM)
        check_what_the_sigterm_left(tmp_path, f"sigterm_{moment}_{frozen_at}", moment, saved_at, returncode, output)
    for moment, frozen_at, _ in SIGTERMS:
        experiment = f"sigterm_{moment}_{frozen_at}"
        resume_and_compare(tmp_path, corpus_files, experiment, reference_scalars, reference)
        # Nothing was lost or logged twice at the stop: train and validation losses of both runs together are
        # the reference's, step for step (the validation the signal landed in ran to its end, once).
        both = tb_scalars(tmp_path / "logs" / experiment)
        for tag in ("train/loss", "val/loss"):
            assert sorted(both[tag]) == sorted(reference_scalars[tag]), (experiment, tag)
            for step, value in reference_scalars[tag].items():
                assert both[tag][step] == pytest.approx(value, abs=1e-5), (experiment, tag, step)


def test_slurm_requeue_still_works_and_the_sigterm_after_it_resumes_exactly(tmp_path, monkeypatch, corpus_files):
    """Lightning's SLURM auto-requeue is untouched: SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`) makes it write
    hpc_ckpt_1.ckpt in the working folder and run `scontrol requeue <job id>` (a stand-in scontrol records the
    call). The SIGTERM SLURM then sends stops the run like any preemption, and the requeued job's
    `lm fit ... --ckpt_path last` resumes exactly."""
    monkeypatch.chdir(tmp_path)
    reference_scalars, reference = run_reference(tmp_path, corpus_files)
    calls = tmp_path / "scontrol.calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "PATH": f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}"}
    process, marker = start_frozen_run(tmp_path, corpus_files, "train_step", 10, "slurm", env=slurm)
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    while not calls.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    returncode, output = signal_when_frozen(process, marker, signal.SIGTERM)
    assert calls.read_text().split() == ["requeue", "4242"], output
    assert "Requeued SLURM job: 4242" in output
    assert load(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 10  # Lightning's, mid-step: --ckpt_path last skips it
    check_what_the_sigterm_left(tmp_path, "slurm", "train_step", 11, returncode, output)
    resume_and_compare(tmp_path, corpus_files, "slurm", reference_scalars, reference)
