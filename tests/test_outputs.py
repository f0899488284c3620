"""A run that cannot save is stopped, loudly: checkpoints/ and logs/ are checked before the first step
(a folder, writable, with room for the checkpoints), and a checkpoint that fails to write during
training is an error (Lightning's own writer swallows a PermissionError: the run trained to the end,
wrote nothing and exited 0)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lightning.pytorch import Callback

import lm.io.files
from lm.callbacks.checkpointing import CheckpointSaveError
from lm.cli.main import main
from lm.errors import LMError

from tests.helpers import TINY_MODEL, TINY_TRAINER, tiny_data


@pytest.fixture(autouse=True)
def raise_lm_errors(monkeypatch):
    """`lm.cli.main.main` raises the LMError (instead of printing it and exiting) so the test can read it."""
    monkeypatch.setenv("LM_DEBUG", "1")


def fit_args(tmp_path: Path, corpus_files, *extra: str) -> list[str]:
    return ["fit", "--experiment", "run", *TINY_MODEL, *TINY_TRAINER, "--trainer.precision", "32-true",
            *tiny_data(corpus_files, tmp_path / "cache", test=False), *extra]


@contextlib.contextmanager
def unwritable(folder: Path):
    """Make `folder` refuse new files the way a user's would: chmod 555 for a normal user; as root (who
    ignores permissions) the folder is made immutable (`chattr +i`) or, on a file system without that,
    covered by a read-only tmpfs. Skips, saying why, only when none of these is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    undo = _make_unwritable(folder)
    try:
        with pytest.raises(OSError):  # the folder really refuses a new file
            (folder / "probe").write_text("x")
        yield folder
    finally:
        undo()


def _make_unwritable(folder: Path):
    """Returns the function that undoes it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    attempts = [(["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]),
                (["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], ["umount", str(folder)])]
    for command, undo in attempts:
        if shutil.which(command[0]) and subprocess.run(command, capture_output=True).returncode == 0:
            return lambda: subprocess.run(undo, check=True)
    pytest.skip("running as root, where chmod does not stop writes, and neither chattr +i nor a read-only "
                "tmpfs mount is possible here (the file-in-the-way and free-space tests still run)")


def test_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    with unwritable(tmp_path / "checkpoints" / "run"), pytest.raises(LMError) as error:
        main(fit_args(tmp_path, corpus_files))
    message = str(error.value)
    assert "checkpoints/run is not writable" in message and "--checkpoint.dirpath" in message
    assert not list((tmp_path / "logs").rglob("events.out.tfevents.*")), "training started"


def test_unwritable_log_folder_is_refused_before_training(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    with unwritable(tmp_path / "logs"), pytest.raises(LMError, match=r"log folder logs/run is not writable"):
        main(fit_args(tmp_path, corpus_files))
    assert not list((tmp_path / "checkpoints").rglob("*.ckpt"))


@pytest.mark.parametrize("where", ["checkpoints", "logs"])
def test_a_file_where_an_output_folder_should_be(tmp_path, monkeypatch, corpus_files, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / where).write_text("not a folder")
    with pytest.raises(LMError, match=rf"{where} is a file\. Move or rename that file"):
        main(fit_args(tmp_path, corpus_files))
    assert (tmp_path / where).read_text() == "not a folder"


def test_not_enough_free_space_for_the_checkpoints(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lm.io.files, "free_bytes", lambda folder: 100_000)  # a nearly full disk
    with pytest.raises(LMError) as error:
        main(fit_args(tmp_path, corpus_files))
    # 2 layers x 32 wide, vocab 300: ~36k parameters x (4 bytes + 8 of AdamW) x 3 files kept or in flight.
    assert "has 100.0 kB free, but this run's checkpoints need about 1.3 MB" in str(error.value)
    assert not (tmp_path / "checkpoints" / "run").exists() or not list((tmp_path / "checkpoints" / "run").iterdir())


class LockFolderAtStep(Callback):
    """Test-only: makes the checkpoint folder unwritable once training reaches `step` (after the checks passed)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step
        self.lock: contextlib.AbstractContextManager | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.lock is None:
            self.lock = unwritable(Path(trainer.checkpoint_callback.dirpath))
            self.lock.__enter__()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.lock is not None:
            self.lock.__exit__(None, None, None)


def test_a_checkpoint_that_cannot_be_written_stops_the_run(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    args = fit_args(tmp_path, corpus_files, "--checkpoint.every_n_train_steps", "3",
                    "--trainer.callbacks+=tests.test_outputs.LockFolderAtStep")
    with pytest.raises(CheckpointSaveError, match=r"Could not write the checkpoint .*checkpoints/run/.*ckpt"):
        main(args)
    assert not list((tmp_path / "checkpoints" / "run").glob("*.ckpt"))
    assert not list((tmp_path / "checkpoints" / "run").glob(".*.tmp")), "a partial file was left"
