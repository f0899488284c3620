"""`NonFiniteGuard(skip_steps=N)` (experiments/trainer/callbacks/nan_skip.yaml): a training step whose loss or
gradient is NaN/inf is skipped (weights untouched), counted in TensorBoard, and the run goes on; the
(N+1)-th such step stops it. NaNs are injected by a model subclass at chosen steps."""

from __future__ import annotations

import pytest
import torch

from lm.callbacks import NonFiniteLossError
from lm.cli.main import main
from lm.modules import LanguageModel

from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, tb_scalars, tiny_data

NAN_SKIP_YAML = str(REPO_ROOT / "experiments" / "trainer" / "callbacks" / "nan_skip.yaml")


class PoisonedModel(LanguageModel):
    """Test-only: a NaN loss at the steps in POISON_LOSS, an inf gradient (finite loss) at POISON_GRAD;
    records, per poisoned step, whether the weights changed over that step."""

    POISON_LOSS: set[int] = set()
    POISON_GRAD: set[int] = set()
    changed: dict[int, bool] = {}

    def compute_loss(self, logits, targets):
        loss = super().compute_loss(logits, targets)
        return loss * float("nan") if self.trainer.global_step in self.POISON_LOSS else loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.POISON_GRAD:
            next(self.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = self.trainer.global_step - 1  # the step just taken
        if step in self.POISON_LOSS | self.POISON_GRAD:
            type(self).changed[step] = any(not torch.equal(a, b) for a, b in zip(self._before, self.parameters()))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LM_DEBUG", "1")  # main() raises the LMError instead of exiting
    monkeypatch.setattr(PoisonedModel, "POISON_LOSS", {2, 5})
    monkeypatch.setattr(PoisonedModel, "POISON_GRAD", {8})
    monkeypatch.setattr(PoisonedModel, "changed", {})


def fit(tmp_path, corpus_files, skip_steps: int) -> None:
    main(["fit", "--experiment", "nan", "--model", "tests.test_nonfinite_skip.PoisonedModel", *TINY_MODEL,
          *TINY_TRAINER, "--trainer.precision", "32-true", *tiny_data(corpus_files, tmp_path / "cache", test=False),
          "--config", NAN_SKIP_YAML, "--trainer.callbacks.init_args.skip_steps", str(skip_steps)])


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"Loss became nan at step 2: step skipped, weights unchanged \(1 of at most 3"):
        fit(tmp_path, corpus_files, skip_steps=3)
    assert PoisonedModel.changed == {2: False, 5: False, 8: False}  # no update on a poisoned step

    last = torch.load(tmp_path / "checkpoints" / "nan" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12  # the run went on to the end
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    guard_state = next(v for k, v in last["callbacks"].items() if k.startswith("NonFiniteGuard"))
    assert guard_state == {"skipped": 3}  # restored by a resume
    counts = tb_scalars(tmp_path / "logs" / "nan")["train/nonfinite_skipped"]
    assert max(counts.values()) == 3 and counts[max(counts)] == 3
    assert [counts[s] for s in sorted(counts) if s <= 2] == [0, 0, 1]  # counted from the skipped step on


def test_the_run_stops_after_the_limit(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"Gradient norm became inf after 2 skipped non-finite steps "
                                                  r"\(the limit, skip_steps\) at step 8"):
        fit(tmp_path, corpus_files, skip_steps=2)
    assert PoisonedModel.changed == {2: False, 5: False}  # step 8 never completed
