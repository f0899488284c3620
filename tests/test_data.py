"""Tests for lm.data: tokenizer, sources, cleaning, token cache, window datasets and TextDataModule."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lm.data import EOT, IGNORE_INDEX, RandomWindowDataset, SequentialWindowDataset, TextDataModule, Tokenizer
from lm.data.clean import clean_document, clean_documents
from lm.data.sources import carve_tail, load_wikitext_split, read_text_files, split_documents
from lm.data.tokens import EpochDistributedSampler, load_cached_tokens, token_dtype

from tests.helpers import SHARED_DATA, WIKITEXT_DIR
UNICODE_TEXT = "naïve café — 日本 🤖 Ωmega\n\n  indented\tand tabbed  \r\n<|endoftext|> after eot"

WORDS = (
    "the of and in to a was is for on as by with he at from his that it were an which first "
    "album song river lobster species century army king city team season game film band church"
).split()


def wikitext_corpus(num_articles: int = 24, seed: int = 0) -> str:
    """A small WikiText-formatted corpus: ' = Title = ' articles with ' = = Section = = ' subsections."""
    rng = random.Random(seed)
    lines = [" \n"]
    for a in range(num_articles):
        lines += [f" = Article {a} {rng.choice(WORDS).title()} = \n", " \n"]
        for s in range(2):
            body = " ".join(rng.choice(WORDS) for _ in range(60))
            lines += [f" {body} . \n", " \n", f" = = Section {s} = = \n", " \n"]
    return "".join(lines)


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """WikiText-style train/valid/test files written into tmp_path (never the shared data)."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    files = {}
    splits = [("train", "wiki.train.raw", 0), ("val", "wiki.valid.raw", 1), ("test", "wiki.test.raw", 2)]
    for split, name, seed in splits:
        (folder / name).write_text(wikitext_corpus(seed=seed), encoding="utf-8")
        files[split] = folder / name
    return files


def make_dm(tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = dict(vocab_size=400, block_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"), min_frequency=2)
    return TextDataModule(**{**defaults, **kwargs})


# ---------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([wikitext_corpus(), UNICODE_TEXT * 3], vocab_size=400)


def test_tokenizer_save_load_roundtrip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert 256 < tokenizer.vocab_size <= 400
    assert tokenizer.eot_id is not None
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no leftover tmp file
    loaded = Tokenizer.from_file(path)
    restored = Tokenizer.from_str(tokenizer.to_str())
    for text in [UNICODE_TEXT, wikitext_corpus(2, seed=7), " leading space", "", "\x00\x01 bytes \u2028"]:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids == restored.encode(text)
        assert tokenizer.decode(ids) == text
        assert loaded.decode(ids) == text
    assert loaded.to_str() == tokenizer.to_str()
    assert tokenizer.encode_batch(["a b", "日本"]) == [tokenizer.encode("a b"), tokenizer.encode("日本")]
    # The special token in raw text is one id, and decodes back to its text.
    assert tokenizer.eot_id in tokenizer.encode(f"x{EOT}y")
    assert tokenizer.decode(tokenizer.encode(f"x{EOT}y")) == f"x{EOT}y"


def test_token_byte_lengths_and_decode_bytes(tokenizer: Tokenizer) -> None:
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == tokenizer.vocab_size
    assert lengths[tokenizer.eot_id] == 0
    assert all(n >= 1 for i, n in enumerate(lengths) if i != tokenizer.eot_id)
    text = UNICODE_TEXT.replace(EOT, "")
    ids = tokenizer.encode(text)
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tokenizer.decode_bytes([tokenizer.eot_id]) == EOT.encode()
    # Streaming: every prefix of the ids is a prefix of the bytes (possibly ending mid-character).
    full = text.encode("utf-8")
    for k in range(len(ids)):
        assert full.startswith(tokenizer.decode_bytes(ids[:k]))
    # A lone 3-byte character split into byte tokens: partial bytes are not valid UTF-8 on their own.
    tiny = Tokenizer.train(["ab"], vocab_size=300, min_frequency=100)  # no merges: pure byte tokens
    ids = tiny.encode("日")
    assert len(ids) == 3 and tiny.decode_bytes(ids[:2]) == "日".encode()[:2]


def test_tokenizer_errors(tmp_path: Path) -> None:
    message = r"vocab_size=100 is too small: .*256 byte tokens plus 1 special tokens, so at least 257"
    with pytest.raises(ValueError, match=message):
        Tokenizer.train(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", ""], vocab_size=300)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Tokenizer.from_file(missing)
    with pytest.raises(ValueError, match="Not a valid tokenizer JSON"):
        Tokenizer.from_str("{not json")


# ---------------------------------------------------------------------- sources and cleaning


def test_split_documents_wikitext_and_plain() -> None:
    text = wikitext_corpus(3)
    docs = split_documents(text)
    assert len(docs) == 3 and "".join(docs) == text
    assert all(" = = Section 0 = = " in d for d in docs)  # subsections stay inside their article
    assert docs[1].startswith(" = Article 1 ")
    plain = "To be, or not to be:\n = that = is not a heading here, no leading newline... \n"
    assert split_documents("ACT I\n\nSCENE I.\n") == ["ACT I\n\nSCENE I.\n"]
    assert split_documents(plain) == [plain]  # " = that = is ..." is not a heading line
    assert split_documents("") == []


def test_clean_documents() -> None:
    raw = " \n = T = \n \n cafe\u0301  \n\n\n\n\n\nend\t \n \n"
    assert clean_document(raw) == " = T =\n\n café\n\n\nend\n"
    assert clean_document(" \n \t\n") == ""
    docs = clean_documents(["a \n", " \n", "a\n", "b"])
    assert docs == ["a\n", "b\n"]  # cleaned, empty dropped, duplicate ("a \n" == "a\n" cleaned) dropped
    assert clean_documents(["a \n", "a \n", ""], clean=False, dedupe=False) == ["a \n", "a \n"]


def test_carve_tail() -> None:
    docs = ["aaaa\nbbbb\n", "cccc\ndddd\n"]
    head, tail, inside = carve_tail(docs, 0.5)
    assert (head, tail, inside) == (["aaaa\nbbbb\n"], ["cccc\ndddd\n"], False)
    head, tail, inside = carve_tail(docs, 0.2)
    assert "".join(head + tail) == "".join(docs) and inside and tail == ["dddd\n"]
    with pytest.raises(ValueError):
        carve_tail(docs, 1.0)


def test_read_text_files_missing_names_every_path(tmp_path: Path) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("hi\r\nthere\n", encoding="utf-8")
    assert read_text_files([ok]) == "hi\nthere\n"  # universal newlines
    with pytest.raises(FileNotFoundError) as err:
        read_text_files([ok, tmp_path / "a.txt", tmp_path / "b.txt"], option="--data.test_files")
    message = str(err.value)
    assert str(tmp_path / "a.txt") in message and str(tmp_path / "b.txt") in message
    assert "--data.test_files" in message and "WikiText-2" in message


def test_wikitext_hub_route_matches_raw_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub route rebuilds the raw file layout (checked against the stored HF Arrow files)."""
    arrow = SHARED_DATA / "wikitext-2-raw-v1-hf-arrow" / "wikitext-validation.arrow"
    if not arrow.is_file() or not (WIKITEXT_DIR / "wiki.valid.raw").is_file():
        pytest.skip(f"shared WikiText files not found under {SHARED_DATA}")
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_file(str(arrow))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text = load_wikitext_split("valid")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation")]
    assert text == (WIKITEXT_DIR / "wiki.valid.raw").read_text(encoding="utf-8")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"(?s)Couldn't reach the Hub.*--data.data_dir"):
        load_wikitext_split("test")


# ---------------------------------------------------------------------- datasets


def test_random_windows_shifted_deterministic_and_epoch_dependent() -> None:
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position: easy contiguity checks
    ds = RandomWindowDataset(tokens, block_size=8, num_samples=50, seed=3)
    x, y = ds[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8,)
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(y, x + 1)  # targets are inputs shifted by one, window is contiguous
        assert 0 <= int(x[0]) and int(y[-1]) < len(tokens)
    epoch0 = [int(ds[i][0][0]) for i in range(len(ds))]
    assert epoch0 == [int(RandomWindowDataset(tokens, 8, 50, seed=3)[i][0][0]) for i in range(50)]
    assert epoch0 != [int(RandomWindowDataset(tokens, 8, 50, seed=4)[i][0][0]) for i in range(50)]
    ds.set_epoch(1)
    epoch1 = [int(ds[i][0][0]) for i in range(len(ds))]
    assert epoch1 != epoch0 and len(set(epoch0) & set(epoch1)) < 10
    ds.set_epoch(0)
    assert [int(ds[i][0][0]) for i in range(len(ds))] == epoch0
    assert len(set(epoch0)) > 40  # spread over the stream, not a handful of positions
    # The last window (start = N - block - 1) is reachable and in range for every start.
    small = RandomWindowDataset(np.arange(10, dtype=np.uint16), block_size=9, num_samples=5)
    assert all(int(small[i][0][0]) == 0 for i in range(5))
    with pytest.raises(ValueError, match=r"has 10 tokens, too few for block_size=10"):
        RandomWindowDataset(np.arange(10, dtype=np.uint16), block_size=10, num_samples=5)


def test_ddp_rank_split_is_disjoint_and_matches_single_process() -> None:
    ds = RandomWindowDataset(np.arange(5000, dtype=np.uint16), block_size=16, num_samples=64, seed=0)
    b = 4
    single = [x for x, _ in DataLoader(ds, batch_size=2 * b)]
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        per_rank.append([x for x, _ in DataLoader(ds, batch_size=b, sampler=sampler)])
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for step, full in enumerate(single):
        r0, r1 = per_rank[0][step], per_rank[1][step]
        rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
        assert not rows(r0) & rows(r1)  # disjoint across ranks
        assert rows(r0) | rows(r1) == rows(full)  # union == one process with twice the batch
    # Our sampler assigns the same indices and forwards set_epoch to the dataset.
    ours = EpochDistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    assert list(ours) == list(DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))
    ours.set_epoch(5)
    assert ds.epoch == 5


def test_epoch_reaches_dataloader_workers() -> None:
    ds = RandomWindowDataset(np.arange(5000, dtype=np.uint16), block_size=16, num_samples=8, seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=1, persistent_workers=True)
    first = next(iter(loader))[0]
    ds.set_epoch(1)
    second = next(iter(loader))[0]  # same persistent worker process, new epoch
    assert not torch.equal(first, second)
    assert torch.equal(second, torch.stack([ds[i][0] for i in range(8)]))


def test_sequential_windows_cover_every_target_once() -> None:
    n, block = 103, 10
    tokens = np.arange(1, n + 1, dtype=np.uint16)
    ds = SequentialWindowDataset(tokens, block_size=block, pad_id=0)
    assert len(ds) == 11 and ds.num_targets == n - 1
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.cat(xs), torch.cat(ys)
    kept = y != IGNORE_INDEX
    assert int(kept.sum()) == n - 1
    assert torch.equal(y[kept], torch.from_numpy(tokens[1:].astype(np.int64)))
    assert torch.equal(x[kept], torch.from_numpy(tokens[:-1].astype(np.int64)))  # input predicts next
    assert torch.all(x[~kept] == 0)
    exact = SequentialWindowDataset(np.arange(21, dtype=np.uint16), block_size=10)
    assert len(exact) == 2 and bool((exact[1][1] != IGNORE_INDEX).all())


def test_token_dtype() -> None:
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------- TextDataModule


def test_prepare_twice_is_cache_hit_and_faster(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    kwargs = dict(data_dir=str(corpus["train"].parent))
    start = time.perf_counter()
    make_dm(tmp_path, **kwargs).prepare_data()
    cold = time.perf_counter() - start
    assert "Tokenizing train" in caplog.text and "Training tokenizer" in caplog.text
    caplog.clear()
    dm = make_dm(tmp_path, **kwargs)
    start = time.perf_counter()
    dm.prepare_data()
    warm = time.perf_counter() - start
    hits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Token cache hit: ")]
    assert len(hits) == 3 and "Tokenizing" not in caplog.text and "Training tokenizer" not in caplog.text
    assert warm < cold
    dm.setup("fit")
    train_bin = dm._tokens("train", dm.tokenizer, {}, build=False).filename
    assert hits[0] == f"Token cache hit: {train_bin} ({dm.num_tokens['train']} tokens)"
    assert set(dm.num_tokens) == {"train", "val", "test"} and dm.num_bytes["train"] > dm.num_tokens["train"]
    meta_files = sorted((tmp_path / "cache" / "tokens").glob("*.json"))
    assert len(meta_files) == 3
    meta = json.loads(meta_files[0].read_text())
    assert {"num_tokens", "dtype", "num_bytes", "source"} <= set(meta) and meta["dtype"] == "uint16"


def test_fit_batches_and_token_stream(corpus, tmp_path) -> None:
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_files=[str(corpus["val"])], samples_per_epoch=10)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer is not None and dm.tokenizer.vocab_size <= dm.vocab_size == 400
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(dm.train_dataloader()) == 2  # 10 samples, batch 4, drop_last for fixed shapes
    # The cached stream is the cleaned documents, each followed by <|endoftext|>.
    train_tokens = dm.train_dataset.tokens
    text = dm.tokenizer.decode(train_tokens.tolist())
    docs = clean_documents(split_documents(corpus["train"].read_text()))
    assert text == "".join(d + EOT for d in docs)
    assert dm.num_bytes["train"] == sum(len(d.encode()) for d in docs)
    assert dm.tokenizer_file is not None and Tokenizer.from_file(dm.tokenizer_file).to_str() == dm.tokenizer.to_str()
    # Workers receive the memmap as a file reference, not a copy of the tokens.
    blob = pickle.dumps(dm.train_dataset)
    assert len(blob) < 2000 < train_tokens.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone.tokens, np.memmap) and torch.equal(clone[3][0], dm.train_dataset[3][0])
    lengths = np.asarray(dm.tokenizer.token_byte_lengths())
    assert int(lengths[train_tokens].sum()) == dm.num_bytes["train"]  # exact bits-per-byte denominator
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (4, 16)
    assert sum(int((b[1] != IGNORE_INDEX).sum()) for b in dm.val_dataloader()) == dm.num_tokens["val"] - 1


def test_val_fraction_carves_the_tail(corpus, tmp_path) -> None:
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.25, test_files=[str(corpus["test"])])
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    docs = clean_documents(split_documents(corpus["train"].read_text()))
    full = "".join(d + EOT for d in docs)
    train_text = dm.tokenizer.decode(dm.train_dataset.tokens.tolist())
    val_text = dm.tokenizer.decode(dm.val_dataset.tokens.tolist())
    assert train_text + val_text == full  # nothing lost or duplicated, val is the tail
    assert val_text.endswith(docs[-1] + EOT) and train_text.endswith(("\n", EOT))  # cut at a line break
    total = dm.num_bytes["train"] + dm.num_bytes["val"]
    assert 0.2 < dm.num_bytes["val"] / total < 0.3
    assert dm.num_tokens["test"] > 0 and dm.test_dataset is not None

    # A plain text file is one document: the cut falls inside it, and the training half gets no
    # end-of-text token (the document goes on in the validation split).
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"line {i} of a long play\n" for i in range(300)), encoding="utf-8")
    dm = make_dm(tmp_path, train_files=str(plain), val_fraction=0.1)  # one path, not a list: also accepted
    assert dm.train_files == [str(plain)]
    dm.prepare_data()
    dm.setup("fit")
    train_text = dm.tokenizer.decode(dm.train_dataset.tokens.tolist())
    val_text = dm.tokenizer.decode(dm.val_dataset.tokens.tolist())
    assert EOT not in train_text and train_text.endswith("line 269 of a long play\n")
    assert val_text == "".join(f"line {i} of a long play\n" for i in range(270, 300)) + EOT


def test_cache_key_changes_when_file_changes(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    kwargs = dict(train_files=[str(corpus["train"])])
    make_dm(tmp_path, **kwargs).prepare_data()
    before = set((tmp_path / "cache" / "tokens").glob("*.bin"))
    corpus["train"].write_text(wikitext_corpus(seed=5), encoding="utf-8")
    caplog.clear()
    dm = make_dm(tmp_path, **kwargs)
    dm.prepare_data()
    assert "Tokenizing train" in caplog.text and "Training tokenizer" in caplog.text
    after = set((tmp_path / "cache" / "tokens").glob("*.bin"))
    assert len(after - before) == 1
    # Settings that change the ids change the key too; block_size/batch_size do not.
    caplog.clear()
    make_dm(tmp_path, **kwargs, block_size=8, batch_size=2).prepare_data()
    assert "Tokenizing" not in caplog.text
    make_dm(tmp_path, **kwargs, clean=False).prepare_data()
    assert "Tokenizing train" in caplog.text


def test_interrupted_or_corrupt_cache_is_never_used(corpus, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    kwargs = dict(train_files=[str(corpus["train"])])
    tokens_dir = tmp_path / "cache" / "tokens"
    import lm.data.tokens as tokens_module

    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith(".bin"):
            raise KeyboardInterrupt  # the process dies after writing the tmp file, before the rename
        real_replace(src, dst)

    monkeypatch.setattr(tokens_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path, **kwargs).prepare_data()
    monkeypatch.setattr(tokens_module.os, "replace", real_replace)
    assert list(tokens_dir.glob("*.bin")) == [] and list(tokens_dir.glob("*.tmp")) == []

    # A stray tmp file from a hard kill (SIGKILL: no cleanup) is ignored.
    (tokens_dir / ".train-deadbeef.bin.abc.tmp").write_bytes(b"\xff" * 1001)
    dm = make_dm(tmp_path, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    good = np.array(dm.train_dataset.tokens)
    assert "Tokenizing train" in caplog.text and good.max() < dm.tokenizer.vocab_size

    # A .bin whose size disagrees with its metadata (truncated) is rebuilt, not read.
    (bin_path,) = tokens_dir.glob("train-*.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    assert load_cached_tokens(bin_path) is None
    caplog.clear()
    dm = make_dm(tmp_path, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    assert "Tokenizing train" in caplog.text
    assert np.array_equal(np.array(dm.train_dataset.tokens), good)
    # A .bin without its metadata file (killed between the two renames) is a miss as well.
    bin_path.with_suffix(".json").unlink()
    assert load_cached_tokens(bin_path) is None


def test_setup_without_prepare_raises(corpus, tmp_path) -> None:
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])])
    with pytest.raises(RuntimeError, match=r"prepare_data\(\) must run before setup\(\)"):
        dm.setup("fit")


def test_no_validation_is_explicit(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])])
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_dataloader() == [] and "training runs without validation" in caplog.text
    with pytest.raises(ValueError, match="No test data for `test`"):
        dm.setup("test")
    # Testing from files alone needs the training run's tokenizer.
    with pytest.raises(ValueError, match="--data.tokenizer_path"):
        make_dm(tmp_path, test_files=[str(corpus["test"])]).prepare_data()
    dm = make_dm(tmp_path, test_files=[str(corpus["test"])], tokenizer_path=str(dm.tokenizer_file))
    dm.prepare_data()
    dm.setup("test")
    assert dm.num_tokens["test"] > 0 and set(dm.num_tokens) == {"test"}


def test_clear_errors(corpus, tmp_path) -> None:
    missing = tmp_path / "missing.raw"
    with pytest.raises(FileNotFoundError, match=rf"(?s){missing}.*--data.train_files"):
        make_dm(tmp_path, train_files=[str(missing)]).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"data_dir not found: .*nowhere"):
        make_dm(tmp_path, data_dir=str(tmp_path / "nowhere")).prepare_data()
    only_valid = tmp_path / "only_valid"
    only_valid.mkdir()
    (only_valid / "wiki.valid.raw").write_text(wikitext_corpus(), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"wiki.train.raw"):
        make_dm(tmp_path, data_dir=str(only_valid)).prepare_data()

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n \t \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train split is empty after cleaning \(source: .*blank.txt"):
        make_dm(tmp_path, train_files=[str(blank)]).prepare_data()

    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*at least 257"):
        make_dm(tmp_path, train_files=[str(corpus["train"])], vocab_size=200)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        make_dm(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="either val_files or val_fraction"):
        make_dm(tmp_path, val_files=["x"], val_fraction=0.1)

    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train split has \d+ tokens, too few for block_size=64"):
        make_dm(tmp_path, train_files=[str(short)], block_size=64).prepare_data()


def test_tokenizer_path_larger_than_vocab_size(corpus, tmp_path) -> None:
    big = Tokenizer.train([wikitext_corpus(), UNICODE_TEXT], vocab_size=450, min_frequency=1)
    assert big.vocab_size > 400
    path = tmp_path / "tok.json"
    big.save(path)
    with pytest.raises(ValueError, match=rf"has {big.vocab_size} tokens.*--data.vocab_size >= {big.vocab_size}"):
        make_dm(tmp_path, train_files=[str(corpus["train"])], tokenizer_path=str(path)).prepare_data()
    # With a large enough vocab_size the given tokenizer is used as is (no training).
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], tokenizer_path=str(path), vocab_size=512)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer.to_str() == big.to_str()
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_set_tokenizer_and_has_validation(corpus, tmp_path) -> None:
    """A checkpoint's tokenizer replaces training one; has_validation is known before any data is read."""
    assert make_dm(tmp_path, train_files=[str(corpus["train"])], val_files=[str(corpus["val"])]).has_validation
    assert make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.1).has_validation
    assert make_dm(tmp_path, data_dir=str(corpus["train"].parent)).has_validation
    assert not make_dm(tmp_path, train_files=[str(corpus["train"])]).has_validation
    assert not make_dm(tmp_path, data_dir=str(tmp_path / "nowhere")).has_validation

    ckpt_tokenizer = Tokenizer.train([UNICODE_TEXT * 20], vocab_size=300)
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], test_files=[str(corpus["test"])])
    dm.set_tokenizer(ckpt_tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.tokenizer is ckpt_tokenizer and not (tmp_path / "cache" / "tokenizers").exists()
    assert dm.tokenizer.decode(dm.test_dataset.tokens.tolist()).startswith(" = Article 0 ")
    big = Tokenizer.train([wikitext_corpus()], 450, min_frequency=1)
    message = rf"The given tokenizer has {big.vocab_size} tokens.*--data.vocab_size >= {big.vocab_size}"
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, vocab_size=300).set_tokenizer(big)


def test_predict_dataloader_yields_prompt_strings(tmp_path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Once upon a time\n\nThe meaning of life is\n", encoding="utf-8")
    # No data source given (so the default would be the Hub): predict must not touch the network.
    dm = make_dm(tmp_path, prompts=["Hello"], prompts_file=str(prompts_file), predict_batch_size=2)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert batches == [["Hello", "Once upon a time"], ["The meaning of life is"]]
    with pytest.raises(ValueError, match="--data.prompts"):
        make_dm(tmp_path).predict_dataloader()


def test_lightning_fit_uses_epoch_sampler(corpus, tmp_path) -> None:
    """In a real Trainer, our sampler survives and each epoch draws new windows."""
    import lightning as L

    seen: list[torch.Tensor] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(400, 8)
            self.head = torch.nn.Linear(8, 400)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 0:
                seen.append(x.clone())
            return torch.nn.functional.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten())

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten())
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.1, samples_per_epoch=8)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(Tiny(), datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, EpochDistributedSampler)
    assert dm.train_dataset.epoch == 1 and len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert dm.hparams.vocab_size == 400 and dm.hparams.val_fraction == 0.1


# ---------------------------------------------------------------------- real data


def test_wikitext2_offline_protocol(tmp_path, caplog) -> None:
    """train = wiki.valid.raw (last 10% validates), test = wiki.test.raw, vocab 8192."""
    if not (WIKITEXT_DIR / "wiki.valid.raw").is_file() or not (WIKITEXT_DIR / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 raw files not found in {WIKITEXT_DIR}")
    caplog.set_level(logging.INFO, logger="lm.data")
    kwargs = dict(
        train_files=[str(WIKITEXT_DIR / "wiki.valid.raw")], val_fraction=0.1,
        test_files=[str(WIKITEXT_DIR / "wiki.test.raw")], vocab_size=8192, block_size=256,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    TextDataModule(**kwargs).prepare_data()
    caplog.clear()
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    assert caplog.text.count("Token cache hit") == 3 and "Tokenizing" not in caplog.text
    dm.setup("fit")
    dm.setup("test")
    n = dm.num_tokens
    assert dm.tokenizer.vocab_size == 8192
    assert 200_000 < n["train"] < 300_000 and 20_000 < n["val"] < 45_000 and 280_000 < n["test"] < 400_000
    assert 0.08 < n["val"] / (n["train"] + n["val"]) < 0.15
    for split in n:  # bytes per token of a BPE-8k on English text
        assert 3.0 < dm.num_bytes[split] / n[split] < 5.0
    eot_count = int((np.asarray(dm.train_dataset.tokens) == dm.tokenizer.eot_id).sum())
    assert 50 <= eot_count <= 60  # one per article (WikiText-2 validation has 60 articles)
