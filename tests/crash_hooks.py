"""Test-only: freeze an `lm` process at one chosen moment so a test's signal lands exactly there.

- `KillPoint`, a callback for `lm fit` (tests/test_crash_safety.py), added with
  `--trainer.callbacks+=tests.crash_hooks.KillPoint --trainer.callbacks.init_args.moment ...`: a SIGKILL ends
  the frozen process, a SIGTERM lets it go on from that moment (as a preemption would);
- `run_frozen`, any verb with one writer patched to stop half-way (tests/test_crash_outputs.py);
- `start_frozen` / `signal_when_frozen` / `kill_when_frozen`, the test side: start such a process, signal it
  once frozen."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

MOMENTS = ("train_step", "validation", "checkpoint_save")


class KillPoint(Callback):
    """At `moment` of optimizer step `step`, write `marker` and wait for a signal.

    - train_step: inside the training step, after the forward pass (`on_before_backward`);
    - validation: after the second batch of the validation that runs at `step`;
    - checkpoint_save: in the middle of writing the first checkpoint file of `step`: half its bytes are
      in the temporary file when the process freezes (after a SIGTERM the other half follows).
    """

    def __init__(self, moment: str, step: int, marker: str) -> None:
        if moment not in MOMENTS:
            raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
        self.moment, self.step, self.marker = moment, step, marker
        self._frozen = False  # once: the run goes on after a SIGTERM, and a later save at `step` must not freeze

    def _at(self, moment: str, trainer) -> bool:
        return self.moment == moment and trainer.global_step == self.step and not self._frozen

    def _freeze(self) -> None:
        """Write the marker and wait. A SIGKILL ends the process here; a SIGTERM ends the wait and reaches the
        handler that was in place (Lightning's, or lm's while it holds the stop), as if it had landed here."""
        handler = signal.getsignal(signal.SIGTERM)
        seen = []

        def on_sigterm(signum, frame) -> None:
            seen.append(signum)
            if callable(handler):
                handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._frozen = True
        Path(self.marker).write_text(self.moment)
        deadline = time.monotonic() + 600
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, handler)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._at("train_step", trainer):
            self._freeze()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._at("validation", trainer) and not trainer.sanity_checking and batch_idx == 1:
            self._freeze()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not self._at("checkpoint_save", trainer):
            return
        real_save = torch.save

        def half_then_freeze(obj, f, *args, **kwargs) -> None:  # the next torch.save: the file write
            torch.save = real_save
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            self._freeze()
            f.write(data[len(data) // 2:])  # after a SIGTERM the save goes on to its end

        torch.save = half_then_freeze


# ------------------------------------------------------------------ freezing other verbs mid-write
def _freeze_at(marker: str) -> None:
    Path(marker).write_text("frozen")
    time.sleep(600)


def _freeze_in_shard_write(marker: str) -> None:
    """`lm prepare`: half of the first token batch is in a shard file, no manifest yet."""
    from lm.data import token_cache as cache

    real_write = cache.ShardWriter.write

    def write(self, ids) -> None:
        real_write(self, ids[: len(ids) // 2])
        self._file.flush()
        _freeze_at(marker)

    cache.ShardWriter.write = write


def _freeze_in_atomic_write(marker: str) -> None:
    """`lm quantize` (and any `lm.io.files` writer): half the bytes are in the temporary file."""
    import lm.io.files

    real = lm.io.files.atomic_write_with

    def half_then_freeze(path, write) -> None:
        def half(f) -> None:
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            _freeze_at(marker)

        real(path, half)

    lm.io.files.atomic_write_with = half_then_freeze


def _freeze_in_export(marker: str) -> None:
    """`lm export`: model.safetensors is written in the temporary folder, config.json is next."""
    from lm.export import safetensors

    safetensors.write_json = lambda path, values: _freeze_at(marker)


FREEZES = {"shard_write": _freeze_in_shard_write, "atomic_write": _freeze_in_atomic_write,
           "export": _freeze_in_export}


def run_frozen(freeze: str, marker: str, argv: list[str]) -> None:
    """`lm <argv>` that freezes at `freeze` (one of FREEZES); run as
    `python -c "from tests.crash_hooks import run_frozen; run_frozen(...)"`."""
    from lm.cli.main import main

    FREEZES[freeze](marker)
    main(argv)


# ------------------------------------------------------------------------------------ test side
def start_frozen(cwd: Path, marker: Path, code: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python <code>` (e.g. `-m lm fit ...` or `-c "...run_frozen(...)"`) in its own session, from `cwd`, with
    `env` added to the environment; its output goes to `<marker>.log` (a pipe could fill up and block it)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(repo)}
    marker.unlink(missing_ok=True)
    with open(f"{marker}.log", "wb") as log:
        return subprocess.Popen([sys.executable, *code], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_frozen_verb(cwd: Path, marker: Path, freeze: str, argv: list[str]) -> subprocess.Popen:
    """`lm <argv>` frozen at `freeze` (see FREEZES)."""
    code = f"from tests.crash_hooks import run_frozen; run_frozen({freeze!r}, {str(marker)!r}, {argv!r})"
    return start_frozen(cwd, marker, ["-c", code])


def signal_when_frozen(process: subprocess.Popen, marker: Path, signum: int, timeout: float = 600) -> tuple[int, str]:
    """Wait for `marker` (the process froze where it should), send `signum`, wait for the exit: (exit status,
    the end of the process's output). The timeout is generous: on a loaded machine starting Python with torch
    alone can take a minute."""
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        os.kill(process.pid, signum)
    returncode = process.wait(timeout=120)  # after a SIGTERM: the rest of a step, a validation, a save
    output = Path(f"{marker}.log").read_text(errors="replace")[-3000:]
    assert marker.exists(), f"the process never reached its kill point (exit {returncode}): {output}"
    return returncode, output


def kill_when_frozen(process: subprocess.Popen, marker: Path, timeout: float = 600) -> None:
    """SIGKILL the process once frozen (see `signal_when_frozen`)."""
    returncode, output = signal_when_frozen(process, marker, signal.SIGKILL, timeout)
    assert returncode == -signal.SIGKILL, output
