"""Callbacks selected from YAML overlays (experiments/trainer/callbacks/), each run through `lm fit` on
the tiny corpus: top-k checkpoints, LR monitor, early stopping, throughput/MFU, text samples in
TensorBoard, the NaN guard, the optional W&B logger, and combining several overlays."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.callbacks import NonFiniteGuard, TokenThroughputMonitor, batch_size, num_tokens
from lm.cli.main import main
from lm.cli.lightning_cli import run_lightning_cli
from lm.model import GPT, GPTConfig
from lm.modules import LanguageModel
from lm.modules.optimizers import warmup_cosine
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, run_lm, scalar_tags, tb_scalars, tiny_data

OVERLAYS = REPO_ROOT / "experiments" / "trainer" / "callbacks"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(workdir: Path, corpus_files, *args: str, experiment: str = "cb"):
    """A tiny `lm fit` (extra args last, so they win); returns the LMCLI (trainer, model, ...)."""
    data = tiny_data(corpus_files, workdir / "cache")
    return run_lightning_cli(["fit", "--experiment", experiment, *TINY_MODEL, *TINY_TRAINER, *data, *args])


def write_overlay(path: Path, callbacks: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": callbacks}}))
    return str(path)


# ------------------------------------------------------------------------------ ModelCheckpoint
def test_top_k_overlay_keeps_k_best_by_val_loss_plus_last(workdir, corpus_files):
    fit(workdir, corpus_files, "--config", str(OVERLAYS / "top_k_checkpoints.yaml"),
        "--trainer.val_check_interval", "2")  # 6 validations over 12 steps
    ckpt_dir = workdir / "checkpoints" / "cb"
    names = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
    assert "last.ckpt" in names
    kept = [p for p in ckpt_dir.glob("step*.ckpt")]
    assert len(kept) == 3, names
    val_losses = scalar_tags(workdir / "logs" / "cb")["val/loss"]
    assert len(val_losses) == 6
    kept_losses = sorted(float(p.stem.rsplit("val_loss", 1)[1]) for p in kept)
    assert kept_losses == pytest.approx(sorted(val_losses)[:3], abs=1e-4)
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 12


def test_last_checkpoint_holds_the_final_step_after_the_last_validation(workdir, corpus_files):
    """12 steps, validation every 5: Lightning alone leaves last.ckpt at step 10, and never validates step 12."""
    fit(workdir, corpus_files, "--trainer.val_check_interval", "5")
    ckpt_dir = workdir / "checkpoints" / "cb"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 12
    val_steps = sorted(tb_scalars(workdir / "logs" / "cb")["val/loss"])
    assert len(val_steps) == 3 and val_steps[-1] == 11, val_steps  # 5, 10 and the final weights (step 12)
    best = [p.name for p in ckpt_dir.glob("step*.ckpt")]  # top-k comes from those validations
    assert len(best) == 1 and best[0].startswith(("step000005-", "step000010-", "step000012-")), best


def test_a_fit_ending_by_max_epochs_validates_its_final_weights(workdir, corpus_files):
    """max_epochs 1 ends the fit on the epoch's last batch, between two validations every 1000 batches."""
    fit(workdir, corpus_files, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
        "--trainer.val_check_interval", "1000", "--trainer.check_val_every_n_epoch", "null",
        "--data.samples_per_epoch", "40")  # 5 batches of 8
    val_steps = sorted(tb_scalars(workdir / "logs" / "cb")["val/loss"])
    assert val_steps == [4], val_steps  # the fifth and last step
    assert [p.name[:10] for p in (workdir / "checkpoints" / "cb").glob("step*.ckpt")] == ["step000005"]


# --------------------------------------------------------------------------- LearningRateMonitor
def test_lr_monitor_logs_warmup_then_cosine(workdir, corpus_files):
    fit(workdir, corpus_files, "--model.warmup_steps", "4")
    scalars = tb_scalars(workdir / "logs" / "cb")
    lr_tags = [t for t in scalars if t.startswith("lr-AdamW")]
    assert lr_tags, list(scalars)
    for tag in lr_tags:  # one per parameter group (decay / no decay), same schedule
        steps = sorted(scalars[tag])
        assert steps == list(range(12))
        expected = [3e-3 * warmup_cosine(step, 4, 12, 0.1) for step in steps]
        values = [scalars[tag][step] for step in steps]
        assert values == pytest.approx(expected, rel=1e-5)
        assert values[:4] == sorted(values[:4]) and values[3:] == sorted(values[3:], reverse=True)


# --------------------------------------------------------------------------------- EarlyStopping
def test_early_stopping_overlay_stops_before_max_steps(workdir, corpus_files, tmp_path):
    # A learning rate of 1e-9 leaves val/loss flat: no improvement of min_delta, so after `patience`
    # more validations (every 2 steps) training stops, far before max_steps.
    cli = fit(workdir, corpus_files, "--config", str(OVERLAYS / "early_stopping.yaml"),
              "--model.learning_rate", "1e-9", "--trainer.max_steps", "40", "--trainer.val_check_interval", "2")
    from lightning.pytorch.callbacks import EarlyStopping

    stopper = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert stopper.patience == 3 and stopper.min_delta == -0.01  # Lightning stores it signed for mode=min
    assert cli.trainer.global_step == 2 * (1 + stopper.patience)  # first validation sets the best, then 3 more
    assert stopper.stopped_epoch >= 0 and cli.trainer.should_stop


# ----------------------------------------------------------------------------- ThroughputMonitor
def test_throughput_overlay_logs_tokens_per_sec_and_mfu(workdir, corpus_files):
    cli = fit(workdir, corpus_files, "--config", str(OVERLAYS / "throughput.yaml"))
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, TokenThroughputMonitor))
    assert monitor.available_flops and monitor.available_flops > 1e9  # measured matmul peak
    tags = scalar_tags(workdir / "logs" / "cb")
    tokens_per_sec = tags["train/device/items_per_sec"]
    assert tokens_per_sec and all(v > 0 for v in tokens_per_sec)
    samples_per_sec = tags["train/device/samples_per_sec"]
    assert tokens_per_sec[-1] == pytest.approx(32 * samples_per_sec[-1], rel=1e-6)  # windows: the context, 32
    flops_per_token = GPT(GPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=32)).flops_per_token(32)
    assert tags["train/device/flops_per_sec"][-1] == pytest.approx(flops_per_token * tokens_per_sec[-1], rel=1e-6)
    mfu = tags["train/device/mfu"]
    assert mfu[-1] == pytest.approx(tags["train/device/flops_per_sec"][-1] / monitor.available_flops, rel=1e-5)
    assert 0 < mfu[-1] < 1


def test_the_matmul_peak_shrinks_its_product_to_the_time_it_is_given(monkeypatch):
    """A dtype without a fast kernel (bf16 on AVX2: one 2048^2 product took a minute) is timed on a product that
    fits the budget; a fast one keeps 2048^2. On a fake clock a 256^2 product takes 5 ms: 2048^2 would take 2.6 s."""
    from lm.callbacks import throughput

    clock = iter(range(10**6))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock) * 0.005)  # each call: 5 ms later
    assert throughput._affordable_size(torch.float32, 2048, seconds=1.0, device="cpu") == 1024  # 0.33 s
    assert throughput._affordable_size(torch.float32, 2048, seconds=6.0, device="cpu") == 2048
    assert throughput._affordable_size(torch.float32, 2048, seconds=1e-6, device="cpu") == 256  # never below 256
    monkeypatch.undo()
    calls = []
    original = throughput._affordable_size
    monkeypatch.setattr(throughput, "_affordable_size", lambda *a: calls.append(a) or 256)
    assert throughput.measure_matmul_flops(torch.float32, seconds=0.05) > 0 and calls  # the probe decides the size
    assert original(torch.float32, 2048, 1.0, "cpu") == 2048  # fp32 is fast on every CPU torch runs on


def test_throughput_monitor_given_peak_and_lightning_functions(workdir, corpus_files):
    # Lightning's own ThroughputMonitor configured from YAML with our importable batch functions.
    overlay = write_overlay(workdir / "tp.yaml", [
        {"class_path": "lm.callbacks.TokenThroughputMonitor", "init_args": {"peak_flops": 1.0e12, "window_size": 4}},
        {"class_path": "lightning.pytorch.callbacks.ThroughputMonitor",
         "init_args": {"batch_size_fn": "lm.callbacks.batch_size", "length_fn": "lm.callbacks.num_tokens",
                       "window_size": 4, "separator": "."}},
    ])
    fit(workdir, corpus_files, "--config", overlay)
    tags = scalar_tags(workdir / "logs" / "cb")
    assert tags["train/device/mfu"][-1] == pytest.approx(tags["train/device/flops_per_sec"][-1] / 1e12, rel=1e-5)
    assert tags["train.device.items_per_sec"]  # plain Lightning monitor: tokens/s (no FLOPs: a warning)
    batch = (torch.zeros(8, 16, dtype=torch.long), torch.zeros(8, 16, dtype=torch.long))
    assert (batch_size(batch), num_tokens(batch)) == (8, 128)


# ----------------------------------------------------------------------------------- TextSampler
def read_text_summaries(log_dir: Path, tag: str) -> list[tuple[int, str]]:
    rows = []
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
        accumulator.Reload()
        if f"{tag}/text_summary" in accumulator.Tags()["tensors"]:
            for event in accumulator.Tensors(f"{tag}/text_summary"):
                rows.append((event.step, event.tensor_proto.string_val[0].decode("utf-8")))
    return rows


def test_text_sampler_logs_samples_to_tensorboard(workdir, corpus_files):
    overlay = write_overlay(workdir / "sampler.yaml", [{
        "class_path": "lm.callbacks.TextSampler",
        "init_args": {"prompts": ["The river", "A small town"], "every_n_steps": 4, "sampling": {"max_new_tokens": 6}},
    }])
    fit(workdir, corpus_files, "--config", overlay)
    rows = read_text_summaries(workdir / "logs" / "cb", "samples")
    assert [step for step, _ in rows] == [4, 8, 12]  # the end of training (12) is not sampled twice
    for _, text in rows:
        assert "```\nThe river▶" in text and "```\nA small town▶" in text
        assert all(len(block.split("▶", 1)[1]) > 0 for block in text.split("```") if "▶" in block)


def test_text_sampler_overlay_samples_at_train_end(workdir, corpus_files):
    cli = fit(workdir, corpus_files, "--config", str(OVERLAYS / "text_sampler.yaml"),
              "--model.config.max_position_embeddings", "64")
    rows = read_text_summaries(workdir / "logs" / "cb", "samples")
    assert [step for step, _ in rows] == [12]  # every_n_steps 100 > max_steps: only the end
    sampler = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TextSampler")
    assert len(sampler.history[0][1]) == len(sampler.prompts) == 3


# ------------------------------------------------------------------------------------- NaN guard
class NaNAtStepModel(LanguageModel):
    """The loss becomes NaN from training step NAN_AT_STEP on (a crafted divergence)."""

    NAN_AT_STEP = 7

    def compute_loss(self, logits, targets):
        loss = super().compute_loss(logits, targets)
        if self.trainer.global_step >= self.NAN_AT_STEP:
            loss = loss * float("nan")
        return loss


def test_nan_guard_stops_with_clear_message_and_keeps_last_good_checkpoint(workdir, corpus_files, capsys):
    data = tiny_data(corpus_files, workdir / "cache")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--experiment", "nan", "--model", "tests.test_callbacks.NaNAtStepModel", *TINY_MODEL,
              *TINY_TRAINER, *data, "--trainer.val_check_interval", "3",
              "--config", str(OVERLAYS / "nan_guard.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = Path("checkpoints") / "nan" / "last.ckpt"
    assert f"Loss became nan at step 7 (epoch 0); last good checkpoint: {last} (step 6)" in err, err[-2000:]
    assert "Lower the learning rate" in err and f"--ckpt_path {last}" in err
    for path in (workdir / "checkpoints" / "nan").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] <= 6, path
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point()), path


def test_nan_guard_without_checkpoint_and_on_gradients():
    from lightning.pytorch import Trainer

    from lm.callbacks import NonFiniteLossError

    guard = NonFiniteGuard()
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="Loss became inf at step 0 .*no checkpoint was written"):
        guard.on_before_backward(trainer, None, torch.tensor(float("inf")))
    guard.on_before_backward(trainer, None, torch.tensor(1.0))  # finite: nothing happens
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer = torch.optim.SGD([param], lr=0.1)
    with pytest.raises(NonFiniteLossError, match="Gradient norm became nan"):
        guard.on_before_optimizer_step(trainer, None, optimizer)


# --------------------------------------------------------------------------------------- W&B
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (optional: `pip install wandb` to use experiments/trainer/wandb.yaml)")
def test_wandb_overlay_logs_offline(workdir, corpus_files, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(workdir, corpus_files, "--config", str(REPO_ROOT / "experiments" / "trainer" / "wandb.yaml"))
    runs = list((workdir / "logs" / "wandb").glob("offline-run-*"))
    assert runs, list(workdir.rglob("*"))[:50]
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert "train/loss" in scalar_tags(workdir / "logs" / "cb")  # TensorBoard still on, same run name


# ------------------------------------------------------------------------------- combining overlays
def test_callback_overlays_combine():
    overlays = ["early_stopping", "throughput", "text_sampler", "nan_guard"]
    configs = [arg for name in overlays for arg in ("--config", f"experiments/trainer/callbacks/{name}.yaml")]
    result = run_lm("fit", "--config", "experiments/wikitext2_cpu.yaml", *configs,
                    "--config", "experiments/trainer/callbacks/top_k_checkpoints.yaml", "--print_config", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = yaml.safe_load(result.stdout)
    assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == [
        "lm.callbacks.ExponentialMovingAverage", "lm.callbacks.TrainingContextSchedule",  # the recipe's own,
        "lightning.pytorch.callbacks.EarlyStopping", "lm.callbacks.TokenThroughputMonitor",  # then the overlays'
        "lm.callbacks.TextSampler", "lm.callbacks.NonFiniteGuard",  # in order
    ]
    assert resolved["checkpoint"]["save_top_k"] == 3 and resolved["checkpoint"]["save_last"] is True
