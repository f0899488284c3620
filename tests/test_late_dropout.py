"""`LateDropout` (lm/callbacks/late_dropout.py): no dropout before `start`, the built rates after, in a fit, after a
resume and when the fit ends; bad settings refused."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lm.callbacks.late_dropout import LateDropout
from lm.data import TextDataModule
from lm.errors import LMError
from lm.model import GPTConfig
from lm.modules import LanguageModel
from tests.conftest import write_corpus_files

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus_files(folder), folder / "cache"


class Recorder(L.Callback):
    """Per training step: the rates of the network's dropout modules during its forward, and the loss."""

    def __init__(self) -> None:
        self.rates: list[set[float]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append({m.p for m in pl_module.model.modules() if isinstance(m, nn.Dropout)})
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def fit(corpus, root: Path, *, dropout: float, start: float | None, max_steps: int = 10,
        ckpt_path: str | None = None) -> tuple[Recorder, L.Trainer]:
    """A tiny fit whose progress at step k is k / 10 (a 10-step LR schedule without warm-up)."""
    files, cache = corpus
    torch.manual_seed(0)
    model = LanguageModel(GPTConfig(**TINY, dropout=dropout, attention_dropout=0.0), warmup_steps=0, max_steps=10)
    recorder = Recorder()
    callbacks = [recorder] if start is None else [LateDropout(start), recorder]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks)
    data = TextDataModule(train_files=str(files["train"]), val_files=str(files["valid"]), vocab_size=300,
                          block_size=32, batch_size=4, cache_dir=str(cache))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return recorder, trainer


def test_no_dropout_before_start_the_built_rate_after(corpus, tmp_path):
    late, trainer = fit(corpus, tmp_path / "late", dropout=0.2, start=0.4)
    assert late.rates == [{0.0}] * 4 + [{0.2}] * 6  # progress 0.0-0.3 off, 0.4-0.9 on
    assert {m.p for m in trainer.lightning_module.model.modules() if isinstance(m, nn.Dropout)} == {0.2}  # restored
    # Before `start` the run is the dropout-free run of the same seed, step for step; after, it is not.
    plain, _ = fit(corpus, tmp_path / "plain", dropout=0.0, start=None)
    assert late.losses[:4] == plain.losses[:4]
    assert all(a != b for a, b in zip(late.losses[4:], plain.losses[4:]))  # step 4's forward already drops


def test_a_resumed_run_goes_on_in_the_right_phase(corpus, tmp_path):
    first, trainer = fit(corpus, tmp_path, dropout=0.2, start=0.8, max_steps=6)
    assert first.rates == [{0.0}] * 6
    checkpoint = str(tmp_path / "step6.ckpt")
    trainer.save_checkpoint(checkpoint)
    resumed, _ = fit(corpus, tmp_path / "resumed", dropout=0.2, start=0.8, ckpt_path=checkpoint)
    assert resumed.rates == [{0.0}] * 2 + [{0.2}] * 2  # steps 6, 7 off; 8, 9 on


@pytest.mark.parametrize("start", [-0.1, 1.5])
def test_a_start_outside_the_run_is_refused(start):
    with pytest.raises(LMError, match=r"start is a fraction of the run in \[0, 1\]"):
        LateDropout(start)


def test_two_late_dropouts_are_refused(corpus, tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[LateDropout(0.3), LateDropout(0.5)])
    files, cache = corpus
    data = TextDataModule(train_files=str(files["train"]), val_files=str(files["valid"]), vocab_size=300,
                          block_size=32, batch_size=4, cache_dir=str(cache))
    with pytest.raises(LMError, match="Two LateDropout callbacks"):
        trainer.fit(LanguageModel(GPTConfig(**TINY), warmup_steps=0, max_steps=1), datamodule=data)


def test_a_module_without_the_schedule_is_refused(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[LateDropout(0.3)])
    with pytest.raises(LMError, match="LateDropout needs an lm.modules.LanguageModel"):
        trainer.fit(Plain(), train_dataloaders=[torch.zeros(1, 2)])
