"""`lm.callbacks.TrainingContextSchedule`: short training windows (same tokens per step) until a share of the
run, the model's full context after; validation untouched; a resumed run goes on in the right phase; bad
settings refused in one line; the YAML overlay composes with the CPU recipe's callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from lm.callbacks import TrainingContextSchedule, split_windows
from lm.cli.main import main
from lm.data import TextDataModule
from lm.errors import LMError
from lm.model import GPTConfig
from lm.modules import LanguageModel
from tests.conftest import write_corpus_files
from tests.helpers import REPO_ROOT, scalar_tags

CONTEXT, SHORT, BATCH = 32, 16, 4  # each training batch: 4 x 32 tokens, or 8 x 16 in the short phase
TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CONTEXT)
OVERLAY = "experiments/trainer/callbacks/short_context_schedule.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """The small corpus and one data cache for the whole module (the tokenizer is trained once)."""
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus_files(folder), folder / "cache"


def datamodule(corpus) -> TextDataModule:
    files, cache = corpus
    return TextDataModule(train_files=str(files["train"]), val_files=str(files["valid"]), vocab_size=300,
                          block_size=CONTEXT, batch_size=BATCH, cache_dir=str(cache))


class WindowRecorder(L.Callback):
    """The (optimizer step, input shape) of every forward of the network, training and evaluation apart."""

    def __init__(self) -> None:
        self.train: list[tuple[int, tuple[int, ...]]] = []
        self.eval: list[tuple[int, ...]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(module, args):
            if module.training:
                self.train.append((trainer.global_step, tuple(args[0].shape)))
            else:
                self.eval.append(tuple(args[0].shape))
        self._hook = pl_module.model.register_forward_pre_hook(record)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._hook.remove()


def fit(corpus, root: Path, *, until: float, max_steps: int = 10, precision: str = "32-true", accumulate: int = 1,
        ckpt_path: str | None = None, model: LanguageModel | None = None) -> tuple[WindowRecorder, L.Trainer]:
    """A tiny fit whose LR schedule (hence the progress) spans 10 optimizer steps and starts decaying at once:
    the progress at step k is k / 10, so the windows are short exactly for the steps k < 10 * until."""
    torch.manual_seed(0)
    model = model or LanguageModel(GPTConfig(**TINY), warmup_steps=0, max_steps=10)
    recorder = WindowRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, precision=precision,
                        accumulate_grad_batches=accumulate, val_check_interval=5, limit_val_batches=2,
                        num_sanity_val_steps=0, log_every_n_steps=1, logger=TensorBoardLogger(root, name="tb"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[TrainingContextSchedule(SHORT, until), recorder])
    trainer.fit(model, datamodule=datamodule(corpus), ckpt_path=ckpt_path)
    return recorder, trainer


def expected_shapes(steps, until: float, per_step: int = 1) -> list[tuple[int, tuple[int, ...]]]:
    return [(step, (BATCH * CONTEXT // SHORT, SHORT) if step / 10 < until else (BATCH, CONTEXT))
            for step in steps for _ in range(per_step)]


# --------------------------------------------------------------------------------------- the cut
def test_split_windows_keeps_every_token_and_the_target_alignment():
    stream = torch.randint(0, 300, (BATCH * (CONTEXT + 1),))
    windows = stream.view(BATCH, CONTEXT + 1)  # as the data cuts them: inputs, and the same shifted by one
    input_ids, targets = windows[:, :-1], windows[:, 1:]
    short_inputs, short_targets = split_windows((input_ids, targets), SHORT)
    assert short_inputs.shape == short_targets.shape == (BATCH * CONTEXT // SHORT, SHORT)
    assert torch.equal(short_inputs.flatten(), input_ids.flatten())  # the same tokens, in the same order
    assert torch.equal(short_targets.flatten(), targets.flatten())
    # Each piece is a valid pair: its targets are its inputs shifted by one, the last one the next token.
    assert torch.equal(short_targets[:, :-1], short_inputs[:, 1:])
    for row in range(short_inputs.shape[0]):
        window, piece = divmod(row, CONTEXT // SHORT)
        assert short_targets[row, -1] == windows[window, (piece + 1) * SHORT]
    assert split_windows((input_ids, targets), None) == (input_ids, targets)


@torch.no_grad()
def test_the_loss_of_a_cut_batch_is_the_mean_loss_of_its_pieces():
    torch.manual_seed(0)
    model = LanguageModel(GPTConfig(**{**TINY, "dropout": 0.0})).eval()
    input_ids, targets = torch.randint(0, 300, (2, BATCH, CONTEXT)).unbind(0)
    cut_loss = model.training_loss(split_windows((input_ids, targets), SHORT))
    pieces = [model.training_loss((input_ids[row:row + 1, start:start + SHORT],
                                   targets[row:row + 1, start:start + SHORT]))
              for row in range(BATCH) for start in range(0, CONTEXT, SHORT)]
    assert float(cut_loss) == pytest.approx(float(torch.stack(pieces).mean()), rel=1e-5)
    # ...and it is not the full windows' loss: the pieces really see less context.
    assert float(cut_loss) != pytest.approx(float(model.training_loss((input_ids, targets))), rel=1e-6)


# ------------------------------------------------------------------------------------ in a fit
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_short_windows_before_until_full_after_validation_untouched(corpus, tmp_path, precision):
    recorder, trainer = fit(corpus, tmp_path, until=0.5, precision=precision)
    assert recorder.train == expected_shapes(range(10), until=0.5)  # steps 0-4 short, 5-9 full
    assert recorder.eval and all(shape[-1] == CONTEXT for shape in recorder.eval)
    contexts = scalar_tags(tmp_path / "tb")["train/context"]
    assert contexts == [SHORT] * 5 + [CONTEXT] * 5
    assert trainer.lightning_module.training_context is None  # full windows again once the fit is over


def test_accumulated_micro_batches_share_their_steps_window(corpus, tmp_path):
    recorder, _ = fit(corpus, tmp_path, until=0.3, accumulate=2)
    assert recorder.train == expected_shapes(range(10), until=0.3, per_step=2)


def test_a_resumed_run_goes_on_in_the_right_phase(corpus, tmp_path):
    first, trainer = fit(corpus, tmp_path, until=0.8, max_steps=6)  # stopped at step 6 of a 10-step schedule
    assert first.train == expected_shapes(range(6), until=0.8)
    checkpoint = str(tmp_path / "step6.ckpt")
    trainer.save_checkpoint(checkpoint)
    resumed, _ = fit(corpus, tmp_path / "resumed", until=0.8, ckpt_path=checkpoint)
    assert resumed.train == expected_shapes(range(6, 10), until=0.8)  # 6, 7 short; 8, 9 full


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("short_context", "until", "message"), [
    (0, 0.7, "short_context must be >= 1"),
    (256, -0.1, "until is a fraction of the run in [0, 1]"),
    (256, 1.5, "until is a fraction of the run in [0, 1]"),
])
def test_bad_settings_are_refused_at_construction(short_context, until, message):
    with pytest.raises(LMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainingContextSchedule(short_context, until)


def test_a_length_that_does_not_divide_the_windows_is_refused_at_fit_start(corpus, tmp_path):
    message = "does not divide the training windows of 32 tokens .* e.g. 8"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[TrainingContextSchedule(12, 0.5)])
    with pytest.raises(LMError, match=message):
        trainer.fit(LanguageModel(GPTConfig(**TINY), warmup_steps=0), datamodule=datamodule(corpus))
    with pytest.raises(LMError, match=message):  # a batch cut directly: the same check
        split_windows((torch.zeros(2, CONTEXT, dtype=torch.long),) * 2, 12)


@pytest.mark.parametrize("short_context", [CONTEXT, 64])
def test_a_context_no_longer_than_short_context_trains_on_full_windows_with_a_warning(corpus, tmp_path, short_context):
    """The CPU recipe has the callback (256 of 512); run at a 32-token context it must still train, on full windows."""
    recorder = WindowRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[TrainingContextSchedule(short_context, 0.9), recorder])
    with pytest.warns(UserWarning, match="not longer than short_context.* full windows throughout"):
        trainer.fit(LanguageModel(GPTConfig(**TINY), warmup_steps=0, max_steps=3), datamodule=datamodule(corpus))
    assert recorder.train == [(step, (BATCH, CONTEXT)) for step in range(3)]
    with pytest.raises(LMError, match=r"is not shorter than the training windows \(32 tokens"):
        split_windows((torch.zeros(2, CONTEXT, dtype=torch.long),) * 2, short_context)  # cut directly: refused


def test_distillation_follows_the_schedule(corpus, tmp_path):
    """lm.modules.Distiller cuts its batch too: the student (and the teacher, on the same pieces) see short windows."""
    from lm.modules.distill import Distiller

    student = Distiller(config=GPTConfig(**TINY), warmup_steps=0, max_steps=10)
    student.teacher = LanguageModel(GPTConfig(**TINY)).model.eval()  # set before setup: no checkpoint to load
    teacher_shapes = []
    student.teacher.register_forward_pre_hook(lambda module, args: teacher_shapes.append(tuple(args[0].shape)))
    recorder, _ = fit(corpus, tmp_path, until=0.5, model=student)
    assert recorder.train == expected_shapes(range(10), 0.5)
    assert teacher_shapes == [shape for _, shape in expected_shapes(range(10), 0.5)]


class IgnoresTrainingContext(LanguageModel):
    """A subclass with its own training_step that never cuts the batch (a variant written before the callback)."""

    def training_step(self, batch, batch_idx):
        return self.compute_loss(self(batch[0]), batch[1])


def test_a_module_that_ignores_the_context_or_is_not_a_language_model_is_refused(corpus, tmp_path):
    with pytest.raises(LMError, match="IgnoresTrainingContext.training_step ignores training_context"):
        fit(corpus, tmp_path, until=0.5, model=IgnoresTrainingContext(GPTConfig(**TINY), warmup_steps=0, max_steps=10))

    class NotALanguageModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[TrainingContextSchedule(SHORT, 0.5)])
    with pytest.raises(LMError, match="needs an lm.modules.LanguageModel .* NotALanguageModel"):
        trainer.fit(NotALanguageModel(), train_dataloaders=torch.utils.data.DataLoader(torch.zeros(4, 2)))


# ----------------------------------------------------------------------------------------- YAML
def test_the_recipe_has_the_schedule_after_its_ema(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/wikitext2_cpu.yaml", "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["lm.callbacks.ExponentialMovingAverage",
                                                    "lm.callbacks.TrainingContextSchedule"]
    assert callbacks[1]["init_args"] == {"short_context": 256, "until": 0.85}


def test_the_overlay_adds_the_schedule_to_a_recipe_without_it_and_two_schedules_are_refused(monkeypatch, capsys,
                                                                                               corpus, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/wikitext2_gpt2_small.yaml", "--config", OVERLAY, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks][-1] == "lm.callbacks.TrainingContextSchedule"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[TrainingContextSchedule(SHORT, 0.5), TrainingContextSchedule(SHORT, 0.9)])
    with pytest.raises(LMError, match="Two TrainingContextSchedule callbacks"):
        trainer.fit(LanguageModel(GPTConfig(**TINY), warmup_steps=0, max_steps=1), datamodule=datamodule(corpus))
