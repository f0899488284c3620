"""BPE-dropout variants of the training split (`data.bpe_dropout`, `data.bpe_dropout_variants`): re-segmented
encodings of the same text, read one per epoch, while validation and test keep the canonical encoding."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.cli.main import main
from lm.data import TextDataModule
from lm.data.loading.windows import VariantWindowDataset
from lm.data.preparation.dropout_variants import variant_folder
from lm.data.preparation.pipeline import format_report
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.io.files import release_lock, try_lock

from tests.helpers import tb_scalars, tiny_data, tiny_model_flags


def datamodule(files: dict[str, Path], cache_dir: Path, **options) -> TextDataModule:
    dm = TextDataModule(train_files=[str(files["train"])], val_files=[str(files["valid"])],
                        test_files=[str(files["test"])], vocab_size=300, cache_dir=str(cache_dir), block_size=16,
                        **options)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def ids(tokens) -> np.ndarray:
    return np.asarray(tokens).astype(np.int64)


def test_variants_are_other_segmentations_of_the_same_text(tmp_path, corpus_files):
    dm = datamodule(corpus_files, tmp_path / "cache", bpe_dropout=0.1, bpe_dropout_variants=3)
    canonical = ids(_canonical_train(dm))
    variants = [ids(v) for v in dm.train_dataset.variants]
    assert len(variants) == 3
    text = dm.tokenizer.decode_bytes(canonical.tolist())
    for k, variant in enumerate(variants):
        assert len(variant) > len(canonical), "dropped merges make longer encodings"
        assert dm.tokenizer.decode_bytes(variant.tolist()) == text, f"variant {k} spells other text"
        # the same documents: an <|endoftext|> after each, at the same places in the text
        assert (variant == dm.tokenizer.eot_id).sum() == (canonical == dm.tokenizer.eot_id).sum()
    for a in range(3):
        for b in range(a + 1, 3):
            assert len(variants[a]) != len(variants[b]) or not np.array_equal(variants[a], variants[b])
    # the training loader of epoch e cuts its windows from variant e % 3 (set_epoch reaches the dataset)
    loader = dm.train_dataloader()
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        inputs, _ = next(iter(loader))
        start = dm.train_dataset.window_start(0, epoch)
        assert torch.equal(inputs[0], torch.from_numpy(variants[epoch % 3][start : start + 16]))
    report = dm.report["train_variants"]
    assert report["bpe_dropout"] == 0.1 and report["tokens"] == [len(v) for v in variants]
    assert "BPE-dropout 0.1: 3 variant(s)" in format_report(dm.report)


def _canonical_train(dm: TextDataModule):
    """The canonical training split this datamodule prepared (the variants' source)."""
    prepared = dm._prepare("fit", build=False)
    return prepared.splits["train"].tokens()


def test_validation_and_test_are_the_canonical_encoding(tmp_path, corpus_files):
    plain = datamodule(corpus_files, tmp_path / "plain")
    dropped = datamodule(corpus_files, tmp_path / "dropped", bpe_dropout=0.2, bpe_dropout_variants=2)
    assert plain.tokenizer.to_str() == dropped.tokenizer.to_str()
    for split in ("val", "test"):
        a, b = getattr(plain, f"{split}_dataset"), getattr(dropped, f"{split}_dataset")
        assert np.array_equal(ids(a.tokens), ids(b.tokens)), split
        assert plain.num_bytes[split] == dropped.num_bytes[split] and plain.num_tokens[split] == dropped.num_tokens[split]
    # the canonical training split is still there, identical, and fixes the samples per epoch
    assert np.array_equal(ids(_canonical_train(plain)), ids(_canonical_train(dropped)))
    assert len(plain.train_dataset) == len(dropped.train_dataset)
    assert type(plain.train_dataset).__name__ == "RandomWindowDataset"


def test_the_cache_is_the_record(tmp_path, corpus_files):
    """A second prepare reads the variants the first wrote (not seedable, so that is what makes runs repeat);
    more variants reuse the first ones; a test-only prepare builds none."""
    first = datamodule(corpus_files, tmp_path / "cache", bpe_dropout=0.1, bpe_dropout_variants=1)
    again = datamodule(corpus_files, tmp_path / "cache", bpe_dropout=0.1, bpe_dropout_variants=2)
    assert np.array_equal(ids(first.train_dataset.variants[0]), ids(again.train_dataset.variants[0]))
    folders = sorted(p.name for p in (tmp_path / "cache" / "tokens").glob("train-dropout-*"))
    assert len(folders) == 2
    other = TextDataModule(test_files=[str(corpus_files["test"])], vocab_size=300, cache_dir=str(tmp_path / "t"),
                           block_size=16, bpe_dropout=0.1, tokenizer_path=str(first.tokenizer_file))  # fmt: skip
    other.prepare_data()
    other.setup("test")
    assert not list((tmp_path / "t" / "tokens").glob("train-dropout-*"))


def test_a_variant_being_built_elsewhere_is_waited_for(tmp_path, corpus_files, caplog):
    """Each variant is built under its cache lock, like a split: while another holder has it, prepare waits."""
    datamodule(corpus_files, tmp_path / "cache")  # the canonical splits, ready
    canonical = next((tmp_path / "cache" / "tokens").glob("train-*"))
    folder = variant_folder(tmp_path / "cache", canonical, 0.1, 0)
    fd = try_lock(tmp_path / "cache" / ".locks" / f"tokens-{folder.name}.lock")  # a flock: a second open waits
    assert fd is not None
    worker = threading.Thread(target=datamodule, args=(corpus_files, tmp_path / "cache"),
                              kwargs={"bpe_dropout": 0.1, "bpe_dropout_variants": 1})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lm.data"):
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not (folder / "manifest.json").exists()
        release_lock(fd)
        worker.join(timeout=120)
    assert not worker.is_alive() and (folder / "manifest.json").is_file()
    assert any("is preparing the same data" in r.getMessage() and folder.name in r.getMessage() for r in caplog.records)


def test_epoch_e_reads_variant_e_mod_k():
    block = 4
    variants = [np.full(40 + 10 * k, k, dtype=np.uint16) for k in range(3)]  # variant k: all ids k, other lengths
    dataset = VariantWindowDataset(variants, block, num_samples=25, seed=7)
    for epoch in range(7):
        dataset.set_epoch(epoch)
        inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert torch.all(inputs == epoch % 3), epoch
        starts = [dataset.window_start(i) for i in range(len(dataset))]
        assert max(starts) < len(variants[epoch % 3]) - block
    # workers get a pickled copy: it keeps the variants and the shared epoch follows set_epoch
    copy = pickle.loads(pickle.dumps(dataset))
    copy.set_epoch(4)
    assert torch.all(copy[0][0] == 1)
    with pytest.raises(LMError):
        VariantWindowDataset([], block, 5)
    with pytest.raises(LMError, match="too few"):
        VariantWindowDataset([variants[0], np.zeros(3, dtype=np.uint16)], block, 5)


@pytest.mark.parametrize("options, match", [
    ({"bpe_dropout": -0.1}, r"bpe_dropout must be in \[0, 1\)"),
    ({"bpe_dropout": 1.0}, r"bpe_dropout must be in \[0, 1\)"),
    ({"bpe_dropout": 0.1, "bpe_dropout_variants": 0}, "bpe_dropout_variants must be >= 1"),
    ({"bpe_dropout": 0.1, "tokenizer_kind": "char"}, "tokenizer_kind is 'char'"),
    ({"bpe_dropout": 0.1, "tokenizer_kind": "word"}, "tokenizer_kind is 'word'"),
    ({"bpe_dropout": 0.1, "tokenizer_kind": "unigram"}, "tokenizer_kind is 'unigram'"),
    ({"bpe_dropout": 0.1, "loader": "litdata"}, "not supported with loader: litdata"),
])  # fmt: skip
def test_bad_settings_are_refused(tmp_path, options, match):
    with pytest.raises(LMError, match=match):
        TextDataModule(train_files=["x.txt"], cache_dir=str(tmp_path), **options)


def test_a_unigram_tokenizer_file_is_refused(tmp_path, corpus_files):
    """tokenizer_kind says bpe but the tokenizer.json given is Unigram: refused when it is read, not a crash."""
    unigram = Tokenizer.train([corpus_files["train"].read_text()], 300, kind="unigram")
    unigram.save(tmp_path / "unigram.json")
    with pytest.raises(LMError, match="needs a BPE tokenizer"):
        datamodule(corpus_files, tmp_path / "cache", bpe_dropout=0.1, tokenizer_path=str(tmp_path / "unigram.json"))


TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
           "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]  # fmt: skip
DROPOUT = ["--data.bpe_dropout", "0.1", "--data.bpe_dropout_variants", "2"]


def fit_args(files: dict[str, Path], cache_dir: Path) -> list[str]:
    """A tiny model over K=2 variants, 3 batches of 8 windows per epoch, 9 steps of LR schedule."""
    return [*tiny_model_flags(context=16, dropout=0.1, warmup_steps=2), *TRAINER,
            *tiny_data(files, cache_dir, samples_per_epoch=24), *DROPOUT,
            "--model.max_steps", "9", "--trainer.check_val_every_n_epoch", "1",
            "--checkpoint.every_n_train_steps", "2"]  # fmt: skip


def loader_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"global_step": state["global_step"], **state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]}


def test_fit_with_variants_runs_and_resumes(tmp_path, monkeypatch, corpus_files):
    """Stopped mid-epoch 1 (variant 1), resumed to the end of epoch 2 (variant 0 again)."""
    monkeypatch.chdir(tmp_path)
    common = fit_args(corpus_files, tmp_path / "cache")
    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "4"])
    state = loader_state(tmp_path / "checkpoints/half/last.ckpt")
    assert state["global_step"] == 4 and state["epoch"] == 1 and state["batches_consumed"] == 1
    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "9", "--ckpt_path", "last"])
    state = loader_state(tmp_path / "checkpoints/half/last.ckpt")
    assert state["global_step"] == 9 and state["epoch"] == 2
    assert len(list((tmp_path / "cache" / "tokens").glob("train-dropout-*"))) == 2  # built once, then read


def test_resume_equals_one_go_and_lm_test_is_canonical(tmp_path, monkeypatch, corpus_files):
    """3 epochs over K=2 variants in one go == stopped mid-epoch 1 and resumed (the variant follows the epoch);
    `lm test` of the checkpoint scores the same with and without the option (the canonical test split)."""
    monkeypatch.chdir(tmp_path)
    common = fit_args(corpus_files, tmp_path / "cache")
    main(["fit", "--experiment", "full", *common, "--trainer.max_steps", "9"])
    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "4"])
    main(["fit", "--experiment", "half", *common, "--trainer.max_steps", "9", "--ckpt_path", "last"])
    full = tb_scalars(tmp_path / "logs" / "full")["train/loss"]
    half = {**tb_scalars(tmp_path / "logs" / "half" / "version_0")["train/loss"],
            **tb_scalars(tmp_path / "logs" / "half" / "version_1")["train/loss"]}
    assert len(full) == 9 and sorted(full) == sorted(half)
    for step, loss in full.items():
        assert half[step] == pytest.approx(loss, abs=1e-5), f"step {step}"

    ckpt = str(tmp_path / "checkpoints/full/last.ckpt")
    data = tiny_data(corpus_files, tmp_path / "cache")
    main(["test", "--experiment", "test_dropout", "--ckpt_path", ckpt, *data, *DROPOUT, *TRAINER[:4]])
    main(["test", "--experiment", "test_plain", "--ckpt_path", ckpt, *data, *TRAINER[:4]])
    with_option, without = (tb_scalars(tmp_path / "logs" / name) for name in ("test_dropout", "test_plain"))
    assert with_option["test/bpb"] == pytest.approx(without["test/bpb"], rel=1e-6)


def test_lm_prepare_reports_the_variants_and_refuses_bad_values(tmp_path, corpus_files, capsys):
    data = tiny_data(corpus_files, tmp_path / "cache")
    main(["prepare", *data, "--data.bpe_dropout", "0.1", "--data.bpe_dropout_variants", "2"])
    out = capsys.readouterr().out
    assert "train, BPE-dropout 0.1: 2 variant(s)" in out and "not seeded" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", *data, "--data.bpe_dropout", "1.5"])
    assert exit_info.value.code == 2
    assert "bpe_dropout must be in [0, 1)" in capsys.readouterr().err
