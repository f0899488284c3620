"""Two real processes at once: two runs of one experiment, two preparations of one cache.

A first `lm` process is paused at a chosen moment (it holds its locks then), a second one is started
against it, then the first is let go, or killed. The experiment lock refuses the second run in one line
naming the first one's pid; the cache lock makes the second preparation wait and then use what the first
wrote; the kernel releases either lock when its process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lm.cli.main import main
from lm.io.files import lock_holder, release_lock, try_lock
from tests.helpers import REPO_ROOT, TINY_MODEL, run_cli_here, run_lm, tiny_data

TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.val_check_interval", "2",
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]

# `lm <args>` in a process that pauses at one moment: writes `marker`, waits for `release` to exist.
PAUSED = """
import sys, time
from pathlib import Path
marker, release, moment, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]

def pause():
    marker.write_text(moment)
    while not release.exists():
        time.sleep(0.05)

if moment == "before_fit":  # an `lm fit` that holds its experiment's lock, its first step not yet taken
    from lm.cli import lightning_cli
    real = lightning_cli.LMCLI.before_fit
    lightning_cli.LMCLI.before_fit = lambda self: (real(self), pause())
else:  # "commit": an `lm prepare` that has written a split's shards, not yet its manifest
    from lm.data.preparation import pipeline
    real = pipeline.commit
    pipeline.commit = lambda folder, manifest: (pause(), real(folder, manifest))
from lm.cli.main import main
sys.argv = ["lm", *args]
main()
"""


@pytest.fixture
def start_paused():
    """`start(workdir, moment, *args)` -> (process, its release file); every process still running when the
    test ends (a failed assertion left it paused) is killed."""
    started: list[subprocess.Popen] = []

    def start(workdir: Path, moment: str, *args: str) -> tuple[subprocess.Popen, Path]:
        marker, release = workdir / f"{moment}.paused", workdir / f"{moment}.release"
        marker.unlink(missing_ok=True)
        release.unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-c", PAUSED, str(marker), str(release), moment, *args],
                                   cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first process never reached its pause"
            time.sleep(0.1)
        return process, release

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)


def test_a_second_run_of_a_running_experiment_is_refused(tmp_path, corpus_files, start_paused, monkeypatch):
    """The runs are `lm` processes, but the last, which only has to train: `lm`'s `main` in this process."""
    data = tiny_data(corpus_files, tmp_path / "cache")
    fit = ["fit", "--experiment", "shared", *TINY_MODEL, *TRAINER, *data]
    first, release = start_paused(tmp_path, "before_fit", *fit, "--trainer.max_steps", "2")

    second = run_lm(*fit, "--trainer.max_steps", "2", cwd=tmp_path)  # started while the first runs
    assert second.returncode == 2, second.stderr[-3000:]
    message = second.stderr.split("error: ", 1)[-1].split("\n")[0]
    assert f"Experiment 'shared' is in use by another run (lm fit, pid {first.pid}, started " in message, message
    assert "Wait for that run to end, then resume it with --ckpt_path last, or give this one another --experiment" \
        in message and "Traceback" not in second.stderr

    release.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    folder = tmp_path / "checkpoints" / "shared"
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]  # one run wrote here, not two
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2

    # The first one has ended: resuming it proceeds. Killed while it holds the lock, it leaves none behind.
    resumed, release = start_paused(tmp_path, "before_fit", *fit, "--trainer.max_steps", "4", "--ckpt_path", "last")
    resumed.send_signal(signal.SIGKILL)
    resumed.communicate(timeout=60)
    monkeypatch.chdir(tmp_path)
    code, output = run_cli_here([*fit, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert code in (0, None), output[-3000:]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4


def test_concurrent_prepares_build_one_cache(tmp_path, corpus_files, start_paused):
    """The second preparation of the same data waits for the first (saying so, with its pid), then uses the
    cache the first committed: one good cache, the same as a preparation alone writes."""
    cache = tmp_path / "cache"
    prepare = ["prepare", *tiny_data(corpus_files, cache)]
    first, release = start_paused(tmp_path, "commit", *prepare)  # its tokenizer saved, the first split's shards written
    log = tmp_path / "second.log"
    with log.open("w") as stderr:
        second = subprocess.Popen([sys.executable, "-m", "lm", *prepare], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            deadline = time.monotonic() + 300
            while "waiting for it to finish" not in log.read_text():
                assert second.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            assert second.poll() is None  # it waits while the first holds the split's lock
            release.touch()
            _, first_err = first.communicate(timeout=300)
            second.communicate(timeout=300)
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate(timeout=60)
    waited = log.read_text()
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, waited[-3000:]
    assert f"Another process (lm prepare, pid {first.pid}, started " in waited
    assert "Tokenizing" not in waited and "Training tokenizer" not in waited  # it built nothing
    assert waited.count("Token cache hit") == 3

    main(["prepare", *tiny_data(corpus_files, tmp_path / "alone")])  # the reference: one preparation, alone
    assert _committed_tokens(cache) == _committed_tokens(tmp_path / "alone")
    assert len(_committed_tokens(cache)) == 3


def test_a_prepare_that_dies_leaves_its_lock_to_the_next(tmp_path, corpus_files, start_paused):
    cache = tmp_path / "cache"
    prepare = ["prepare", *tiny_data(corpus_files, cache)]
    first, _ = start_paused(tmp_path, "commit", *prepare)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    main(prepare)  # the lock is free and the half-written split is rebuilt
    main(["prepare", *tiny_data(corpus_files, tmp_path / "alone")])
    assert _committed_tokens(cache) == _committed_tokens(tmp_path / "alone")


def _committed_tokens(cache: Path) -> dict[str, bytes]:
    """split folder -> its token bytes, for every split with a manifest."""
    return {folder.name: b"".join(p.read_bytes() for p in sorted(folder.glob("shard-*.bin")))
            for folder in (cache / "tokens").iterdir() if (folder / "manifest.json").is_file()}


def test_a_lock_is_refused_while_held_and_names_its_holder(tmp_path):
    path = tmp_path / "locks" / "x.lock"
    held = try_lock(path, "lm fit")
    assert held is not None and lock_holder(path)["pid"] == os.getpid() and lock_holder(path)["command"] == "lm fit"
    assert try_lock(path) is None  # another open of the file: another holder, refused (even in this process)
    release_lock(held)
    again = try_lock(path)
    assert again is not None
    release_lock(again)
