"""`ExponentialMovingAverage`: a short run never saves its initialization; a long one saves the average."""

from __future__ import annotations

import torch

from tests.helpers import TINY_MODEL, TINY_TRAINER, run_lm, tiny_data

EMA = "lm.callbacks.ExponentialMovingAverage"


def _fit(tmp_path, corpus_files, name: str, start: int, steps: int) -> dict:
    trainer = [a for a in TINY_TRAINER]
    trainer[trainer.index("--trainer.max_steps") + 1] = str(steps)
    result = run_lm("fit", "--experiment", name, *tiny_data(corpus_files, tmp_path / "cache"), *TINY_MODEL, *trainer,
                    "--trainer.callbacks+", EMA, "--trainer.callbacks.init_args.decay", "0.9",
                    "--trainer.callbacks.init_args.update_starting_at_step", str(start), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(tmp_path / "checkpoints" / name / "last.ckpt", weights_only=True)


def test_before_averaging_starts_the_checkpoint_holds_the_trained_weights(tmp_path, corpus_files):
    checkpoint = _fit(tmp_path, corpus_files, "short", start=100, steps=12)  # averaging would start after the run ends
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(value, checkpoint["current_model_state"][name]), name


def test_after_averaging_starts_the_checkpoint_holds_the_average(tmp_path, corpus_files):
    checkpoint = _fit(tmp_path, corpus_files, "long", start=2, steps=12)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    differs = [n for n in averaged if averaged[n].is_floating_point() and not torch.equal(averaged[n], current[n])]
    assert differs and "model.embed_tokens.weight" in differs


def test_sharded_runs_refuse_the_average_and_the_fsdp_overlays_drop_it():
    """FSDP modules cannot be copied: the callback says what to do instead of failing in a deepcopy, and
    the recipe + FSDP overlay commands the README shows train without it."""
    from pathlib import Path
    from types import SimpleNamespace

    import pytest
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lm.callbacks import ExponentialMovingAverage
    from lm.errors import LMError
    from lm.cli.lightning_cli import parse_recipe

    trainer = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy))
    with pytest.raises(LMError, match="drop the callback for sharded runs"):
        ExponentialMovingAverage().setup(trainer, torch.nn.Linear(2, 2), "fit")
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    recipe = ["--config", str(experiments / "wikitext2_cpu.yaml")]
    assert [c.class_path for c in parse_recipe(recipe).trainer.callbacks] == [EMA, "lm.callbacks.TrainingContextSchedule"]
    for overlay in ("fsdp2_cpu.yaml", "fsdp.yaml"):
        assert not parse_recipe([*recipe, "--config", str(experiments / "trainer" / overlay)]).trainer.callbacks
