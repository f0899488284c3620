"""Sequence classification (lm/modules/classifier.py, lm/data/finetuning/classification_data.py, `lm finetune`): metrics on a
crafted set equal hand-computed values, a frozen backbone is unchanged after an epoch, pooling ignores
padding, file formats and the seeded split, and an end-to-end `lm finetune fit` + `lm eval`."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lm.cli.main import main
from lm.data.finetuning.classification_data import ClassificationDataModule, encode_sentences, read_labelled_file, seeded_split
from lm.modules.classifier import SequenceClassifier, classification_metrics
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint

SENTENCES = {1: ["The river was built in the capital city .", "Her first album became famous in 1854 ."],
             0: ["The railway was destroyed in the early spring .", "A small town was destroyed in a quiet valley ."]}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    tokenizer = tiny_tokenizer()
    ckpt = write_checkpoint(tmp / "backbone.ckpt", tiny_gpt(tokenizer.vocab_size), tokenizer)
    lines = [f"{label} {s}" for _ in range(8) for label, group in SENTENCES.items() for s in group]
    for split in ("train", "dev", "test"):
        (tmp / f"stsa.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp, ckpt, tokenizer


def test_metrics_on_a_crafted_set_equal_hand_computed_values():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 0, 1, 2, 2])
    values = classification_metrics(3)(preds, labels)
    # per class F1: 0: P 1, R 2/3 -> 0.8; 1: P 1/2, R 1/2 -> 0.5; 2: P 1/2, R 1 -> 2/3
    assert values["acc"].item() == pytest.approx(4 / 6)
    assert values["f1"].item() == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert values["confusion_matrix"].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_ignores_right_padding(backbone, pooling):
    _, ckpt, tokenizer = backbone
    model = SequenceClassifier(str(ckpt), pooling=pooling).eval()
    texts = ["The river", "A small town was destroyed in the early spring ."]
    ids, lengths = encode_sentences(tokenizer, texts, 32)
    assert ids[0, lengths[0]:].eq(tokenizer.eot_id).all() and ids[0, lengths[0] - 1] == tokenizer.eot_id
    batched = model(ids, lengths)
    alone = model(ids[:1, :lengths[0]], lengths[:1])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_blocks", [0, 1])
def test_frozen_backbone_is_unchanged_after_an_epoch(backbone, train_blocks):
    tmp, ckpt, _ = backbone
    model = SequenceClassifier(str(ckpt), train_blocks=train_blocks, learning_rate=1e-2, warmup_steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ClassificationDataModule(train_file=str(tmp / "stsa.train"), val_file=str(tmp / "stsa.dev"), batch_size=8)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last = f"model.layers.{model.model.config.num_hidden_layers - 1}."
    expected_prefixes = ("head.",) if train_blocks == 0 else ("head.", last, "model.norm.")
    assert changed and all(k.startswith(expected_prefixes) for k in changed), sorted(changed)
    assert any(k.startswith("head.") for k in changed)
    if train_blocks:
        assert any(k.startswith(last) for k in changed)


def test_files_split_and_errors(tmp_path):
    assert read_labelled_file(_write(tmp_path / "a.txt", "1 good film\n\n0 bad one\n")) == [(1, "good film"), (0, "bad one")]
    with pytest.raises(ValueError, match="a.txt:1"):
        read_labelled_file(_write(tmp_path / "a.txt", "positive good film\n"))
    pos = tmp_path / "p"
    pos.write_bytes("caf\xe9 is great\n".encode("latin-1") * 10)
    neg = tmp_path / "n"
    neg.write_bytes(b"dull\n" * 10)
    data = ClassificationDataModule(class_files=[str(neg), str(pos)], encoding="latin-1", val_fraction=0.2,
                                    test_fraction=0.2, split_seed=3)
    data.setup("fit")
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert (1, "café is great") in data.splits["train"] + data.splits["val"] + data.splits["test"]
    assert seeded_split(list(range(20)), [0.2, 0.2], 3) == seeded_split(list(range(20)), [0.2, 0.2], 3)
    assert seeded_split(list(range(20)), [0.2], 3) != seeded_split(list(range(20)), [0.2], 4)


def test_finetune_cli_then_lm_eval(backbone, monkeypatch, capsys):
    tmp, ckpt, _ = backbone
    monkeypatch.chdir(tmp)
    main(["finetune", "fit", "--experiment", "clf",
          "--model", "lm.modules.classifier.SequenceClassifier", "--model.backbone", str(ckpt),
          "--model.learning_rate", "3e-3", "--model.warmup_steps", "2",
          "--data", "lm.data.finetuning.classification_data.ClassificationDataModule", "--data.train_file", "stsa.train",
          "--data.val_file", "stsa.dev", "--data.test_file", "stsa.test", "--data.batch_size", "8",
          "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    clf = tmp / "checkpoints" / "clf" / "last.ckpt"
    main(["finetune", "test", "--experiment", "clf_test", "--ckpt_path", str(clf),
          "--data", "lm.data.finetuning.classification_data.ClassificationDataModule", "--data.train_file", "stsa.train",
          "--data.test_file", "stsa.test", "--trainer.enable_progress_bar", "false"])
    out = tmp / "eval.json"
    main(["eval", "--ckpt_path", str(clf), "--labelled_file", "stsa.test", "--output", str(out)])
    scores = json.loads(out.read_text())["classification"]
    assert scores["examples"] == 32 and sum(map(sum, scores["confusion_matrix"])) == 32
    assert scores["accuracy"] == pytest.approx(sum(scores["confusion_matrix"][i][i] for i in range(2)) / 32)
    assert "confusion matrix" in capsys.readouterr().out


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
