"""`--model.init_from`: a new run starts from a checkpoint's weights (fresh optimizer and step counter,
the checkpoint's tokenizer), and a checkpoint whose shapes or tokenizer don't fit is refused with a
message that names the difference."""

from __future__ import annotations

import pytest
import torch

from lm.io.checkpoints import read_checkpoint
from lm.cli.main import main
from lm.data.tokenizer import Tokenizer
from tests.conftest import make_corpus
from tests.helpers import TINY_MODEL, tiny_data
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]


@pytest.fixture
def start(tmp_path, monkeypatch, corpus_files):
    monkeypatch.chdir(tmp_path)
    tokenizer = tiny_tokenizer(300)
    model = tiny_gpt(tokenizer.vocab_size, seed=7)
    ckpt = write_checkpoint(tmp_path / "start.ckpt", model, tokenizer)
    return ckpt, model, tokenizer, tiny_data(corpus_files, tmp_path / "cache")


def test_new_run_starts_from_the_weights(start):
    ckpt, model, tokenizer, data = start
    main(["fit", "--experiment", "cont", *TINY_MODEL, *TRAINER, *data, "--model.init_from", str(ckpt),
          "--model.learning_rate", "1e-12"])
    saved = read_checkpoint("checkpoints/cont/last.ckpt")
    assert saved["global_step"] == 2 and saved["tokenizer"] == tokenizer.to_str()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][f"model.{name}"], value, atol=1e-6, rtol=0)


def test_mismatched_shapes_or_tokenizer_are_refused(start, tmp_path, capsys):
    ckpt, _, _, data = start
    with pytest.raises(SystemExit):
        main(["fit", "--experiment", "bad", *TINY_MODEL, *TRAINER, *data, "--model.init_from", str(ckpt),
              "--model.config.hidden_size", "64"])
    assert "hidden_size: this run 64, checkpoint 32" in capsys.readouterr().err
    other = Tokenizer.train([make_corpus(30, 9) + " zebra quantum"], vocab_size=300)
    other.save(tmp_path / "other.json")
    with pytest.raises(SystemExit):
        main(["fit", "--experiment", "bad2", *TINY_MODEL, *TRAINER, *data, "--model.init_from", str(ckpt),
              "--data.tokenizer_path", str(tmp_path / "other.json")])
    err = capsys.readouterr().err
    assert "Cannot initialize from" in err and "tokenizer: both have" in err
