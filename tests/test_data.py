"""Tests for lm.data: sources, cleaning (dedup, PII), tokenizers, staging, the sharded cache, prepare,
window datasets, the LitData path and TextDataModule. Everything runs on small text the tests write."""

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

from lm.runtime.allocator import MALLOC_ENV, fast_allocator
from lm.data import EOT, IGNORE_INDEX, RandomWindowDataset, SequentialWindowDataset, TextDataModule, Tokenizer
from lm.data.token_cache import TokenShards, read_manifest, token_dtype
from lm.data.preparation.clean import CleaningOptions, CleaningReport, clean_documents, normalize, redact_pii
from lm.data.preparation.split_plan import make_plan
from lm.data.preparation.pipeline import PrepareOptions, TokenizerOptions, format_report, prepare
from lm.data.preparation.sources import FileSource, HubSource, split_articles
from lm.data.preparation.staging import StagedDocuments, carve_tail
from lm.data.loading.windows import EpochDistributedSampler

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


def articles(text: str) -> list[str]:
    return list(split_articles(text.splitlines(keepends=True)))


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """WikiText-style train/valid/test files written into tmp_path (never the shared data)."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    files = {}
    for split, name, seed in [("train", "wiki.train.raw", 0), ("val", "wiki.valid.raw", 1), ("test", "wiki.test.raw", 2)]:
        (folder / name).write_text(wikitext_corpus(seed=seed), encoding="utf-8")
        files[split] = folder / name
    return files


def make_dm(tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = dict(vocab_size=400, block_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"), min_frequency=2)
    return TextDataModule(**{**defaults, **kwargs})


def stream_text(dm: TextDataModule, dataset) -> str:
    return dm.tokenizer.decode(np.asarray(dataset.tokens).tolist())


# ---------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([wikitext_corpus(), UNICODE_TEXT * 3], vocab_size=400)


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "unigram"])
def test_every_tokenizer_kind_round_trips_with_exact_bytes(kind: str, tmp_path: Path) -> None:
    train = [wikitext_corpus(6), UNICODE_TEXT * 3]
    tok = Tokenizer.train(train, vocab_size=320, min_frequency=2, kind=kind)
    assert 257 <= tok.vocab_size <= 320 and tok.eot_id is not None
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    lengths = loaded.token_byte_lengths()
    for text in [UNICODE_TEXT, wikitext_corpus(2, seed=7), " leading space", "", "\x00\x01 bytes \u2028 ☃ unseen"]:
        ids = loaded.encode(text)
        assert ids == tok.encode(text) and loaded.decode(ids) == text
        assert loaded.decode_bytes(ids) == text.encode("utf-8")
        # Exact bits-per-byte: token byte lengths sum to the text's UTF-8 length (special tokens: 0).
        assert sum(lengths[i] for i in ids if i != loaded.eot_id) == len(text.replace(EOT, "").encode("utf-8"))
    assert lengths[loaded.eot_id] == 0
    # `encode` goes through the batch call's fast variant (no character offsets): the backend's own ids.
    for text in [UNICODE_TEXT, f"two{EOT}documents \r\n  spaces", "", wikitext_corpus(2, seed=3)]:
        assert loaded.encode(text) == loaded._tok.encode(text, add_special_tokens=False).ids
    # Each kind makes its own kind of long token.
    ids = tok.encode(" the river")
    assert len(ids) < len(" the river") or kind == "char"
    if kind == "char":
        assert len(tok.encode("café")) == 4  # "é" is one character token (seen in training)


def test_tokenizer_save_load_roundtrip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no leftover tmp file
    restored = Tokenizer.from_str(tokenizer.to_str())
    assert restored.encode(UNICODE_TEXT) == tokenizer.encode(UNICODE_TEXT)
    assert tokenizer.encode_batch(["a b", "日本"]) == [tokenizer.encode("a b"), tokenizer.encode("日本")]
    assert tokenizer.eot_id in tokenizer.encode(f"x{EOT}y")
    # Streaming: every prefix of the ids is a prefix of the bytes (possibly ending mid-character).
    ids = tokenizer.encode("日本 🤖")
    assert all("日本 🤖".encode().startswith(tokenizer.decode_bytes(ids[:k])) for k in range(len(ids)))


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small: .*so at least 257"):
        Tokenizer.train(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="Unknown tokenizer kind 'sentencepiece'"):
        Tokenizer.train(["hello"], vocab_size=300, kind="sentencepiece")
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(ValueError, match="Not a valid tokenizer JSON"):
        Tokenizer.from_str("{not json")


# ---------------------------------------------------------------------- sources


def test_split_articles_wikitext_and_plain() -> None:
    text = wikitext_corpus(3)
    docs = articles(text)
    assert len(docs) == 3 and "".join(docs) == text
    assert all(" = = Section 0 = = " in d for d in docs) and docs[1].startswith(" = Article 1 ")
    plain = "To be, or not to be:\n = that = is not a heading here... \n"
    assert articles(plain) == [plain] and articles("") == []


def test_file_formats_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hi\r\nthere\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", None, "p2"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert list(FileSource((str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"))).documents()) == ["hi\nthere\n", "one", "two"]
    assert list(FileSource((str(tmp_path / "c.parquet"),), text_field="body").documents()) == ["p1", "p2"]
    fingerprint = FileSource((str(tmp_path / "*.jsonl"),)).fingerprint()
    assert [Path(f["path"]).name for f in fingerprint["files"]] == ["b.jsonl"]


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl:2 has no 'text' field \(it has: \['content'\]\).*--data.text_field"):
        list(FileSource((str(tmp_path / "rows.jsonl"),)).documents())
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        list(FileSource((str(tmp_path / "empty.txt"),)).documents())
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"blob.bin looks like a binary file"):
        list(FileSource((str(tmp_path / "blob.bin"),)).documents())
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not valid UTF-8"):
        list(FileSource((str(tmp_path / "latin1.txt"),)).documents())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no 'text' column \(it has: \['body'\]\)"):
        list(FileSource((str(tmp_path / "t.parquet"),)).documents())
    with pytest.raises(FileNotFoundError) as err:
        FileSource((str(tmp_path / "a.txt"), str(tmp_path / "none*.txt")), option="--data.test_files").files()
    assert "none*.txt" in str(err.value) and "--data.test_files" in str(err.value)


def test_hub_sources_wikitext_preset_and_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "Salesforce/wikitext":  # one row per line, blank lines as ""
            return datasets.Dataset.from_dict({"text": [" = A = \n", "", " body \n", " = B = \n", " more \n"]})
        rows = [{"content": "doc one"}, {"content": "doc two"}]
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "validation").documents()) == [
        " = A = \n \n body \n", " = B = \n more \n"]  # fmt: skip
    source = HubSource("me/corpus", None, "train", text_field="content", streaming=True)
    assert list(source.documents()) == ["doc one", "doc two"] and calls[-1] == ("me/corpus", None, "train", True)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"(?s)Couldn't reach the Hub.*--data.data_dir"):
        list(HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test").documents())


# ---------------------------------------------------------------------- cleaning


def test_normalize_defaults_and_options() -> None:
    raw = " \n = T = \n \n cafe\u0301  \n\n\n\n\n\nend\t \n \n"
    assert normalize(raw, CleaningOptions()) == " = T =\n\n café\n\n\nend\n"
    assert normalize(" \n \t\n", CleaningOptions()) == ""
    assert normalize("ﬁne  x\x07y", CleaningOptions(unicode="NFKC", whitespace="collapse")) == "fine xy\n"
    assert normalize("cafÃ© Über", CleaningOptions(fix_encoding=True, lowercase=True)) == "café über\n"


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), 2):  # 2 words changed in 200: Jaccard(5-grams) ~ 0.9
        words[i] = "changed"
    return " ".join(words)


def test_cleaning_removes_duplicates_filters_and_redacts_pii_with_a_report() -> None:
    rng = random.Random(0)
    distinct = [" ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(200)) for _ in range(6)]
    docs = [
        distinct[0], distinct[1], distinct[0],            # exact duplicate of 0
        near_copy(distinct[1], rng),                      # near duplicate of 1
        distinct[2], "   \n", "tiny",                     # empty, too short
        "spam spam spam\n" * 20,                          # repeated lines
        distinct[3] + " mail jane.doe@example.com or +44 20 7946 0958 from 10.0.0.1, card 4111 1111 1111 1111",
        distinct[4], near_copy(distinct[4], rng), distinct[5] + " order 1234 5678 9012 3456 stays",
    ]  # fmt: skip
    options = CleaningOptions(near_dedup=True, min_chars=10, max_duplicate_line_fraction=0.5, redact_pii=True)
    report = CleaningReport()
    kept = list(clean_documents(docs, options, report))
    assert report.documents_in == 12 and report.documents_out == len(kept) == 6
    assert dict(report.removed) == {"exact_duplicate": 1, "near_duplicate": 2, "empty": 1, "too_short": 1,
                                    "repeated_lines": 1}  # fmt: skip
    assert dict(report.pii) == {"email": 1, "phone": 1, "ip_address": 1, "credit_card": 1}
    pii_doc = next(d for d in kept if "<EMAIL>" in d)
    assert "<PHONE>" in pii_doc and "<IP_ADDRESS>" in pii_doc and "<CREDIT_CARD>" in pii_doc and "@" not in pii_doc
    assert "1234 5678 9012 3456 stays" in kept[-1]  # fails the Luhn check: not a card number
    assert [d.split()[:3] for d in kept[:3]] == [distinct[0].split()[:3], distinct[1].split()[:3], distinct[2].split()[:3]]
    # Without near dedup the near copies stay; clean=False (options None) keeps bytes as they are.
    assert len(list(clean_documents(docs, CleaningOptions(near_dedup=False)))) == 10
    assert list(clean_documents(["a \n", "a \n", ""], None)) == ["a \n", "a \n"]
    assert redact_pii("call (555) 123-4567 in 1998-2001, 12 345 people") == "call <PHONE> in 1998-2001, 12 345 people"


# ---------------------------------------------------------------------- staging, carving, shards


def test_carve_tail_on_staged_documents(tmp_path: Path) -> None:
    staged = StagedDocuments(tmp_path / "s.txt", ["aaaa\nbbbb\n", "cccc\ndddd\n"])
    head, tail = carve_tail(staged, 0.5)
    assert list(head) == [("aaaa\nbbbb\n", True)] and list(tail) == [("cccc\ndddd\n", True)]
    head, tail = carve_tail(staged, 0.2)  # the cut falls inside document 2: its first half gets no EOT
    assert list(head) == [("aaaa\nbbbb\n", True), ("cccc\n", False)] and list(tail) == [("dddd\n", True)]
    with pytest.raises(ValueError):
        carve_tail(staged, 1.0)


def test_token_shards_read_across_boundaries_and_pickle(tmp_path: Path) -> None:
    from lm.data.token_cache import ShardWriter

    writer = ShardWriter(tmp_path, np.dtype(np.uint16), shard_tokens=7)
    writer.write(np.arange(10))
    writer.write(np.arange(10, 20))
    shards = writer.close()
    assert [s["num_tokens"] for s in shards] == [7, 7, 6]
    tokens = TokenShards([tmp_path / s["file"] for s in shards], [7, 7, 6], np.uint16)
    assert len(tokens) == 20 and tokens[5:16].tolist() == list(range(5, 16)) and tokens[13] == 13
    clone = pickle.loads(pickle.dumps(tokens))
    assert len(pickle.dumps(tokens)) < 1000 and np.array_equal(np.asarray(clone), np.arange(20))
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_cached_tokens_equal_the_tokenizers_own_encoding(tokenizer, tmp_path, monkeypatch) -> None:
    """Batched, multi-process encoding (any allocator, tiktoken fast path or HF) writes exactly encode(doc) + EOT
    per document."""
    from lm.data.preparation import encode
    from lm.data.token_cache import ShardWriter

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300))) for _ in range(60)]
    docs += [UNICODE_TEXT, "  lead space\n\n\ntrailing\n", "x", *TRICKY_TEXTS]
    pieces = [(d, True) for d in docs] + [("a document cut here, continued elsewhere\n", False)]
    expected = [i for d in docs for i in [*tokenizer.encode(d), tokenizer.eot_id]]
    expected += tokenizer.encode(pieces[-1][0])  # no EOT: the document does not end in this split
    monkeypatch.setattr(encode, "BATCH_CHARS", 2000)  # many batches, so order across workers matters
    for num_proc, allocator in [(1, None), (2, None), (2, "system"), (1, "no-fast-path")]:
        if allocator == "no-fast-path":
            monkeypatch.setattr(encode, "verified_fast_encoder", lambda *args: None)
        elif allocator:
            monkeypatch.setenv(MALLOC_ENV, allocator)
        folder = tmp_path / f"{num_proc}-{allocator}"
        folder.mkdir()
        writer = ShardWriter(folder, token_dtype(tokenizer.vocab_size), shard_tokens=500)
        counts = encode.encode_to_shards(pieces, tokenizer, writer, num_proc=num_proc)
        shards = writer.close()
        tokens = TokenShards([folder / s["file"] for s in shards], [s["num_tokens"] for s in shards], writer.dtype)
        assert np.asarray(tokens).tolist() == expected, (num_proc, allocator)
        assert counts.num_tokens == len(expected) and len(shards) > 2
        assert counts.num_bytes == sum(len(text.encode("utf-8")) for text, _ in pieces)


TRICKY_TEXTS = [
    UNICODE_TEXT, "It's they're we've I'm you'll he'd 'quoted' ''double'' rock'n'roll",
    "digits 1234567890 3.14159 1,000,000 2026-11-24 x1y2z3", "runs   of    spaces\t\t\ttabs\n\n\n\nnew  \n  lines   ",
    "emoji 🤖🎉👩‍👩‍👧 flags 🇫🇷 and ZWJ", "Ωmega Ελληνικά русский العربية हिन्दी 한국어 中文", "", " ", "\n", "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|> c<|endoftext", "   leading and trailing   ", "mixed\u00a0nbsp\u2003em space",
]


@pytest.mark.parametrize("vocab_size", [300, 400, 2000])
def test_tiktoken_fast_path_gives_the_hf_ids(vocab_size: int) -> None:
    """The fast encoder (lm/data/preparation/fast_bpe.py) equals HF tokenizers on Unicode, digits, whitespace, apostrophes, emoji."""
    from lm.data.preparation.fast_bpe import fast_encoder

    rng = random.Random(vocab_size)
    texts = TRICKY_TEXTS + [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(20)] + [wikitext_corpus(3)]
    tok = Tokenizer.train([wikitext_corpus(), UNICODE_TEXT * 3, *TRICKY_TEXTS], vocab_size=vocab_size)
    fast = fast_encoder(tok)
    assert fast is not None
    assert fast.encode_batch(texts) == tok.encode_batch(texts)
    assert fast_encoder(Tokenizer.train([wikitext_corpus()], vocab_size=320, kind="char")) is None  # not BPE


def test_encoding_falls_back_to_hf_when_the_fast_path_disagrees(tokenizer, tmp_path, monkeypatch, caplog) -> None:
    from lm.data.preparation import encode
    from lm.data.token_cache import ShardWriter
    from lm.data.preparation.fast_bpe import FastBPE

    monkeypatch.setattr(FastBPE, "encode_batch", lambda self, texts: [[1] for _ in texts])
    pieces = [(t, True) for t in TRICKY_TEXTS]
    assert encode.verified_fast_encoder(tokenizer, pieces) is None
    assert "disagrees" in caplog.text
    writer = ShardWriter(tmp_path, token_dtype(tokenizer.vocab_size))
    encode.encode_to_shards(pieces, tokenizer, writer, num_proc=1)
    shards = writer.close()
    tokens = TokenShards([tmp_path / s["file"] for s in shards], [s["num_tokens"] for s in shards], writer.dtype)
    assert np.asarray(tokens).tolist() == [i for t in TRICKY_TEXTS for i in [*tokenizer.encode(t), tokenizer.eot_id]]


def test_encode_workers_share_the_cores_and_pick_the_allocator(monkeypatch, tmp_path) -> None:
    from lm.data.preparation import encode

    monkeypatch.setattr(encode, "usable_cpus", lambda: 4)
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert encode.worker_environment(4) == {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert encode.worker_environment(2) == {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    assert encode.worker_environment(8)["RAYON_NUM_THREADS"] == "1"  # never zero threads
    monkeypatch.setenv(MALLOC_ENV, str(tmp_path / "libother.so"))
    monkeypatch.setenv("LD_PRELOAD", "libkept.so")
    assert encode.worker_environment(4)["LD_PRELOAD"] == f"{tmp_path / 'libother.so'} libkept.so"
    monkeypatch.delenv(MALLOC_ENV)
    found = fast_allocator()  # mimalloc from cmeel-mimalloc (or the system's), where installed
    assert found is None or "mimalloc" in found
    with encode._environment({"LM_TEST_VARIABLE": "set"}):
        assert os.environ["LM_TEST_VARIABLE"] == "set"
    assert "LM_TEST_VARIABLE" not in os.environ


# ---------------------------------------------------------------------- window datasets


def test_random_windows_shifted_deterministic_and_epoch_dependent() -> None:
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position: easy contiguity checks
    ds = RandomWindowDataset(tokens, block_size=8, num_samples=50, seed=3)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.int64 and torch.equal(y, x + 1)
    epoch0 = [int(ds[i][0][0]) for i in range(len(ds))]
    assert epoch0 == [int(RandomWindowDataset(tokens, 8, 50, seed=3)[i][0][0]) for i in range(50)]
    assert epoch0 != [int(RandomWindowDataset(tokens, 8, 50, seed=4)[i][0][0]) for i in range(50)]
    ds.set_epoch(1)
    assert len(set(epoch0) & {int(ds[i][0][0]) for i in range(len(ds))}) < 10
    small = RandomWindowDataset(np.arange(10, dtype=np.uint16), block_size=9, num_samples=5)
    assert all(int(small[i][0][0]) == 0 for i in range(5))
    with pytest.raises(ValueError, match=r"has 10 tokens, too few for block_size=10"):
        RandomWindowDataset(np.arange(10, dtype=np.uint16), block_size=10, num_samples=5)


def test_ddp_rank_split_is_disjoint_and_matches_single_process() -> None:
    ds = RandomWindowDataset(np.arange(5000, dtype=np.uint16), block_size=16, num_samples=64, seed=0)
    single = [x for x, _ in DataLoader(ds, batch_size=8)]
    per_rank = [[x for x, _ in DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, 2, rank, shuffle=False))]
                for rank in range(2)]  # fmt: skip
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    for step, full in enumerate(single):
        assert not rows(per_rank[0][step]) & rows(per_rank[1][step])
        assert rows(per_rank[0][step]) | rows(per_rank[1][step]) == rows(full)
    ours = EpochDistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    assert list(ours) == list(DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))
    ours.set_epoch(5)
    assert ds.epoch == 5


def test_sequential_windows_cover_every_target_once() -> None:
    n, block = 103, 10
    tokens = np.arange(1, n + 1, dtype=np.uint16)
    ds = SequentialWindowDataset(tokens, block_size=block, pad_id=0)
    assert len(ds) == 11 and ds.num_targets == n - 1
    x, y = (torch.cat(t) for t in zip(*(ds[i] for i in range(len(ds)))))
    kept = y != IGNORE_INDEX
    assert torch.equal(y[kept], torch.from_numpy(tokens[1:].astype(np.int64)))
    assert torch.equal(x[kept], torch.from_numpy(tokens[:-1].astype(np.int64))) and torch.all(x[~kept] == 0)


# ---------------------------------------------------------------------- prepare (no Lightning)


def test_prepare_without_lightning_report_and_interrupted_build_is_redone(corpus, tmp_path, monkeypatch) -> None:
    plan = make_plan(data_dir=None, files={"train": [str(corpus["train"])], "val": None, "test": None},
                     hub_name="x", hub_config=None, val_fraction=0.25)  # fmt: skip
    options = PrepareOptions(tmp_path / "cache", tokenizer=TokenizerOptions(vocab_size=300), shard_tokens=500)
    import lm.data.preparation.pipeline as prepare_module

    real_commit = prepare_module.commit

    def killed(folder, manifest):
        raise KeyboardInterrupt  # the process dies after the shards, before the manifest

    monkeypatch.setattr(prepare_module, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(plan, ["train", "val"], options)
    (folder,) = (tmp_path / "cache" / "tokens").glob("train-*")
    assert list(folder.glob("shard-*.bin")) and read_manifest(folder) is None  # shards without a manifest: untrusted
    with pytest.raises(ValueError, match=r"prepare_data\(\) must run before setup\(\)"):
        prepare(plan, ["train", "val"], options, build=False)
    monkeypatch.setattr(prepare_module, "commit", real_commit)
    prepared = prepare(plan, ["train", "val"], options)
    train = prepared.splits["train"]
    assert len(train.manifest["shards"]) > 1 and all(s["num_tokens"] <= 500 for s in train.manifest["shards"])
    text = prepared.tokenizer.decode(train.tokens().tolist()) + prepared.tokenizer.decode(prepared.splits["val"].tokens().tolist())
    assert text == "".join(d + EOT for d in clean_documents(articles(corpus["train"].read_text()), CleaningOptions()))
    report = json.loads(prepared.report_file.read_text())
    assert report["splits"]["train"]["documents_in"] == 24 and report["splits"]["train"]["tokens"] == len(train.tokens())
    assert "bytes/token" in format_report(report)
    # A shard truncated after the commit is caught by the size check and rebuilt.
    first = folder / train.manifest["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    assert read_manifest(folder) is None
    again = prepare(plan, ["train", "val"], options)
    assert np.array_equal(np.asarray(again.splits["train"].tokens()), np.asarray(train.tokens()))


def test_a_warm_prepare_leaves_the_report_of_the_build(corpus, tmp_path) -> None:
    """The report describes the prepare that built the splits: a cache hit (e.g. of a run that then fails on
    bad input) leaves it byte for byte; a missing report is written again; a rebuild rewrites it."""
    plan = make_plan(data_dir=None, files={"train": [str(corpus["train"])], "val": None, "test": None},
                     hub_name="x", hub_config=None, val_fraction=0.25)  # fmt: skip
    options = PrepareOptions(tmp_path / "cache", tokenizer=TokenizerOptions(vocab_size=300))
    built = prepare(plan, ["train", "val"], options)
    written = built.report_file.read_bytes()
    warm = prepare(plan, ["train", "val"], options)
    assert warm.report_file == built.report_file and warm.report_file.read_bytes() == written
    assert warm.report["seconds"] != json.loads(written)["seconds"]  # the hit's own times: printed, not saved
    built.report_file.unlink()
    assert prepare(plan, ["train", "val"], options).report_file.is_file()
    (built.splits["train"].folder / "manifest.json").unlink()  # the split is rebuilt: its report too
    rebuilt = prepare(plan, ["train", "val"], options)
    assert json.loads(rebuilt.report_file.read_text())["seconds"] == rebuilt.report["seconds"]


def test_two_processes_encode_the_same_ids(corpus, tmp_path) -> None:
    plan = make_plan(data_dir=None, files={"train": [str(corpus["train"])], "val": None, "test": None},
                     hub_name="x", hub_config=None)  # fmt: skip
    one = prepare(plan, ["train"], PrepareOptions(tmp_path / "a", tokenizer=TokenizerOptions(vocab_size=300), num_proc=1))
    tok = TokenizerOptions(path=str(one.tokenizer_file))
    two = prepare(plan, ["train"], PrepareOptions(tmp_path / "b", tokenizer=tok, num_proc=2))
    assert np.array_equal(np.asarray(one.splits["train"].tokens()), np.asarray(two.splits["train"].tokens()))


# ---------------------------------------------------------------------- TextDataModule


def test_prepare_twice_is_cache_hit_and_faster(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    start = time.perf_counter()
    make_dm(tmp_path, data_dir=str(corpus["train"].parent)).prepare_data()
    cold = time.perf_counter() - start
    assert "Tokenizing train" in caplog.text and "Training tokenizer" in caplog.text
    caplog.clear()
    dm = make_dm(tmp_path, data_dir=str(corpus["train"].parent))
    start = time.perf_counter()
    dm.prepare_data()
    assert time.perf_counter() - start < cold
    assert caplog.text.count("Token cache hit: ") == 3 and "Tokenizing" not in caplog.text
    dm.setup("fit")
    assert set(dm.num_tokens) == {"train", "val", "test"} and dm.num_bytes["train"] > dm.num_tokens["train"]


def test_fit_batches_and_token_stream(corpus, tmp_path) -> None:
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_files=[str(corpus["val"])], samples_per_epoch=10)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(dm.train_dataloader()) == 2  # 10 samples, batch 4, drop_last for fixed shapes
    docs = list(clean_documents(articles(corpus["train"].read_text()), CleaningOptions()))
    assert stream_text(dm, dm.train_dataset) == "".join(d + EOT for d in docs)
    assert dm.num_bytes["train"] == sum(len(d.encode()) for d in docs)
    lengths = np.asarray(dm.tokenizer.token_byte_lengths())
    assert int(lengths[np.asarray(dm.train_dataset.tokens)].sum()) == dm.num_bytes["train"]  # exact bpb denominator
    blob = pickle.dumps(dm.train_dataset)  # workers get file names, not a copy of the tokens
    assert len(blob) < 3000 and torch.equal(pickle.loads(blob)[3][0], dm.train_dataset[3][0])
    assert sum(int((b[1] != IGNORE_INDEX).sum()) for b in dm.val_dataloader()) == dm.num_tokens["val"] - 1


def test_val_fraction_carves_the_tail_in_characters(corpus, tmp_path) -> None:
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.25, test_files=[str(corpus["test"])])
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    docs = list(clean_documents(articles(corpus["train"].read_text()), CleaningOptions()))
    train_text, val_text = stream_text(dm, dm.train_dataset), stream_text(dm, dm.val_dataset)
    assert train_text + val_text == "".join(d + EOT for d in docs)
    assert 0.22 < len(val_text.replace(EOT, "")) / len("".join(docs)) < 0.28  # 25% of the characters
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"line {i} of a long play\n" for i in range(300)), encoding="utf-8")
    dm = make_dm(tmp_path, train_files=str(plain), val_fraction=0.1)  # one path, not a list: also accepted
    dm.prepare_data()
    dm.setup("fit")
    train_text, val_text = stream_text(dm, dm.train_dataset), stream_text(dm, dm.val_dataset)
    assert EOT not in train_text and train_text.endswith("line 269 of a long play\n")
    assert val_text == "".join(f"line {i} of a long play\n" for i in range(270, 300)) + EOT


def test_cache_key_follows_files_cleaning_and_tokenizer_kind(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    make_dm(tmp_path, train_files=[str(corpus["train"])]).prepare_data()
    corpus["train"].write_text(wikitext_corpus(seed=5), encoding="utf-8")
    caplog.clear()
    make_dm(tmp_path, train_files=[str(corpus["train"])]).prepare_data()
    assert "Tokenizing train" in caplog.text and "Training tokenizer" in caplog.text
    caplog.clear()
    make_dm(tmp_path, train_files=[str(corpus["train"])], block_size=8, batch_size=2).prepare_data()
    assert "Tokenizing" not in caplog.text
    for changed in [dict(clean=False), dict(cleaning=CleaningOptions(lowercase=True)), dict(tokenizer_kind="word")]:
        caplog.clear()
        make_dm(tmp_path, train_files=[str(corpus["train"])], **changed).prepare_data()
        assert "Tokenizing train" in caplog.text, changed


def test_no_validation_missing_data_and_tokenizer_handoff(corpus, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lm.data")
    dm = make_dm(tmp_path, train_files=[str(corpus["train"])])
    with pytest.raises(ValueError, match=r"prepare_data\(\) must run before setup\(\)"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_dataloader() == [] and "training runs without validation" in caplog.text
    with pytest.raises(ValueError, match="No test data for `test`"):
        dm.setup("test")
    with pytest.raises(ValueError, match="--data.tokenizer_path"):
        make_dm(tmp_path, test_files=[str(corpus["test"])]).prepare_data()
    test_dm = make_dm(tmp_path, test_files=[str(corpus["test"])], tokenizer_path=str(dm.tokenizer_file))
    test_dm.prepare_data()
    test_dm.setup("test")
    assert set(test_dm.num_tokens) == {"test"}
    # A checkpoint's tokenizer replaces training one; has_validation is known before any data is read.
    assert make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.1).has_validation
    assert make_dm(tmp_path, data_dir=str(corpus["train"].parent)).has_validation
    assert not make_dm(tmp_path, data_dir=str(tmp_path / "nowhere")).has_validation
    ckpt_tokenizer = Tokenizer.train([UNICODE_TEXT * 20], vocab_size=300)
    given = make_dm(tmp_path / "given", train_files=[str(corpus["train"])], test_files=[str(corpus["test"])])
    given.set_tokenizer(ckpt_tokenizer)
    given.prepare_data()
    given.setup("test")
    assert given.tokenizer is ckpt_tokenizer and not (tmp_path / "given" / "cache" / "tokenizers").exists()
    big = Tokenizer.train([wikitext_corpus()], 450, min_frequency=1)
    with pytest.raises(ValueError, match=rf"The given tokenizer has {big.vocab_size} tokens.*--data.vocab_size"):
        make_dm(tmp_path, vocab_size=300).set_tokenizer(big)


def test_clear_errors(corpus, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)missing.raw.*--data.train_files"):
        make_dm(tmp_path, train_files=[str(tmp_path / "missing.raw")]).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"data_dir not found: .*nowhere"):
        make_dm(tmp_path, data_dir=str(tmp_path / "nowhere")).prepare_data()
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n \t \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train split is empty after cleaning \(source: .*blank.txt"):
        make_dm(tmp_path, train_files=[str(blank)]).prepare_data()
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*at least 257"):
        make_dm(tmp_path, vocab_size=200)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        make_dm(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="either val_files or val_fraction"):
        make_dm(tmp_path, val_files=["x"], val_fraction=0.1)
    with pytest.raises(ValueError, match=r"near_dedup_threshold must be in \(0, 1\]"):
        CleaningOptions(near_dedup_threshold=1.5)
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n", encoding="utf-8")
    dm = make_dm(tmp_path, train_files=[str(short)], block_size=64)
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"train split has \d+ tokens, too few for block_size=64"):
        dm.setup("fit")


def test_predict_dataloader_yields_prompt_strings(tmp_path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Once upon a time\n\nThe meaning of life is\n", encoding="utf-8")
    dm = make_dm(tmp_path, prompts=["Hello"], prompts_file=str(prompts_file), predict_batch_size=2)
    dm.setup("predict")  # no data source given (default: the Hub): predict must not touch the network
    assert list(dm.predict_dataloader()) == [["Hello", "Once upon a time"], ["The meaning of life is"]]
    with pytest.raises(ValueError, match="--data.prompts"):
        make_dm(tmp_path).predict_dataloader()


class _Bigram(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(400, 8)
        self.head = torch.nn.Linear(8, 400)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten(), reduction="sum")


def test_lightning_fit_uses_epoch_sampler(corpus, tmp_path) -> None:
    import lightning as L

    seen: list[torch.Tensor] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Bigram()

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                seen.append(batch[0].clone())
            return self.net.loss(*batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.net.loss(*batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], val_fraction=0.1, samples_per_epoch=8)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)  # fmt: skip
    trainer.fit(Tiny(), datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, EpochDistributedSampler)
    assert dm.train_dataset.epoch == 1 and len(seen) == 2 and not torch.equal(seen[0], seen[1])


def test_litdata_chunks_same_windows_and_loss_and_resume(corpus, tmp_path) -> None:
    pytest.importorskip("litdata", reason="litdata not installed (make venv installs it)")
    from lm.data.loading.litdata_chunks import streaming_dataset, streaming_loader

    dm = make_dm(tmp_path, train_files=[str(corpus["train"])], loader="litdata", batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    base = dm._litdata_dir(dm._prepare("fit", build=False))
    ordered = streaming_dataset(base, 16, seed=0, shuffle=False)
    memmap = dm._prepare("fit", build=False).splits["train"].tokens()
    assert len(ordered) == len(memmap) // 17
    windows = torch.stack([torch.from_numpy(memmap[k * 17 : (k + 1) * 17].astype(np.int64)) for k in range(len(ordered))])
    streamed = torch.stack([ordered[k].long() for k in range(len(ordered))])
    assert torch.equal(streamed, windows)
    net = _Bigram()
    assert torch.equal(net.loss(streamed[:, :-1], streamed[:, 1:]), net.loss(windows[:, :-1], windows[:, 1:]))
    # The training loader (shuffled) resumes mid-epoch from its state_dict, as Lightning does.
    loader = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    expected = next(iterator)[0]
    resumed = streaming_loader(streaming_dataset(base, 16, seed=dm.hparams.seed), 4)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[0], expected)


# ---------------------------------------------------------------------- real data


def test_wikitext2_offline_protocol(tmp_path, caplog) -> None:
    """train = wiki.valid.raw (last 10% validates), test = wiki.test.raw, vocab 8192."""
    if not (WIKITEXT_DIR / "wiki.valid.raw").is_file() or not (WIKITEXT_DIR / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 raw files not found in {WIKITEXT_DIR}")
    caplog.set_level(logging.INFO, logger="lm.data")
    kwargs = dict(train_files=[str(WIKITEXT_DIR / "wiki.valid.raw")], val_fraction=0.1, block_size=256,
                  test_files=[str(WIKITEXT_DIR / "wiki.test.raw")], vocab_size=8192, cache_dir=str(tmp_path / "c"))  # fmt: skip
    TextDataModule(**kwargs).prepare_data()
    caplog.clear()
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    assert caplog.text.count("Token cache hit") == 3 and "Tokenizing" not in caplog.text
    dm.setup("fit")
    dm.setup("test")
    n = dm.num_tokens
    assert 200_000 < n["train"] < 300_000 and 20_000 < n["val"] < 45_000 and 280_000 < n["test"] < 400_000
    for split in n:  # bytes per token of a BPE-8k on English text
        assert 3.0 < dm.num_bytes[split] / n[split] < 5.0
    eot_count = int((np.asarray(dm.train_dataset.tokens) == dm.tokenizer.eot_id).sum())
    assert 50 <= eot_count <= 60  # one per article (WikiText-2 validation has 60 articles)


# ---------------------------------------------------------------------- lm prepare and the YAMLs


def test_lm_prepare_prints_the_report_and_fit_reuses_the_cache(tmp_path, capsys) -> None:
    from lm.cli.main import main

    rows = [{"text": f"Document {i}: " + " ".join(random.Random(i).choice(WORDS) for _ in range(80))} for i in range(30)]
    rows += [rows[0], {"text": "write to someone@example.org please " * 3}]  # an exact duplicate, an e-mail
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = ["--data.train_files", str(tmp_path / "*.jsonl"), "--data.val_fraction", "0.1", "--data.vocab_size", "300",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.clean", "true",  # the WikiText recipe trains on raw bytes
            "--data.cleaning.redact_pii", "true"]  # fmt: skip
    main(["prepare", "--config", "experiments/wikitext2_cpu.yaml", *args])
    out = capsys.readouterr().out
    assert "removed: exact_duplicate 1" in out and "PII replaced: email 3" in out and "bytes/token" in out
    (report_file,) = (tmp_path / "cache" / "reports").glob("*.json")
    assert json.loads(report_file.read_text())["splits"]["train"]["documents_out"] == 31
    from lm.commands.prepare import build_parser

    parser = build_parser()
    dm = parser.instantiate_classes(parser.parse_args(["--config", "experiments/wikitext2_cpu.yaml", *args])).data
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # lm's logger does not propagate to pytest's capture once `lm` has run
    data_logger = logging.getLogger("lm.data")
    data_logger.addHandler(handler)
    level, data_logger.level = data_logger.level, logging.INFO
    try:
        dm.prepare_data()  # what `lm fit` runs: its logs say the cache was reused
    finally:
        data_logger.removeHandler(handler)
        data_logger.setLevel(level)
    logs = "\n".join(r.getMessage() for r in records)
    assert logs.count("Token cache hit") == 2 and "Tokenizing" not in logs


def test_the_cleaning_overlay_cleans_on_top_of_the_raw_bytes_recipe(tmp_path, capsys) -> None:
    """experiments/data/jsonl_cleaned.yaml's own command: the base recipe says `clean: false` (WikiText is scored
    raw), the overlay asks for dedup and PII redaction, and the overlay wins (issue 25: it cleaned nothing)."""
    from lm.cli.main import main

    rng = random.Random(25)
    unique = [f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(90)) for i in range(100)]
    pii = [f"Note {i}: write to jane.doe{i}@example.org " if i < 10 else
           f"Note {i}: call +44 20 7946 0{i:03d} " if i < 20 else f"Note {i}: the server is 10.0.{i}.7 "
           for i in range(30)]  # fmt: skip
    pii = [text + " ".join(rng.choice(WORDS) for _ in range(60)) for text in pii]
    exact = unique[:25]
    near = [" ".join(w if k != 45 else "changed" for k, w in enumerate(doc.split())) for doc in unique[25:50]]
    docs = unique + pii + exact + near  # 180: 25 exact and 25 near duplicates, 30 documents with PII
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    main(["prepare", "--config", str(root / "experiments/wikitext2_cpu.yaml"),
          "--config", str(root / "experiments/data/jsonl_cleaned.yaml"),
          "--data.train_files", str(tmp_path / "corpus" / "*.jsonl"), "--data.cache_dir", str(tmp_path / "cache")])
    assert "PII replaced: email 10" in capsys.readouterr().out
    (report_file,) = (tmp_path / "cache" / "reports").glob("*.json")
    train = json.loads(report_file.read_text())["splits"]["train"]
    assert train["documents_in"] == 180
    assert train["removed"]["exact_duplicate"] == 25 and train["removed"]["near_duplicate"] >= 20  # MinHash estimates
    assert train["documents_out"] == 180 - sum(train["removed"].values())
    assert train["pii_replaced"] == {"email": 10, "phone": 10, "ip_address": 10}


@pytest.mark.parametrize("overlay", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "experiments" / "data").glob("*.yaml")))
def test_data_overlays_parse(overlay: str) -> None:
    from lm.commands.prepare import build_parser

    parser = build_parser()
    config = parser.parse_args(["--config", "experiments/wikitext2_cpu.yaml", "--config", f"experiments/data/{overlay}"])
    dm = parser.instantiate_classes(config).data
    assert dm.vocab_size >= 256


def test_prepare_benchmark_runs_and_prints_every_stage() -> None:
    """benchmarks/prepare.py end to end on a tiny corpus (its figures are measurements, not assertions)."""
    import subprocess
    import sys

    if not WIKITEXT_DIR.is_dir():
        pytest.skip(f"shared corpora not found under {SHARED_DATA}")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "prepare.py"), "--mb", "0.3", "--train-mb", "0.2",
                             "--vocab-size", "300", "--skip-wikitext"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("read JSONL", "clean (NFC", "near dedup", "tokenizer training", "encode, 1 process", "encode, 2 process"):
        assert stage in result.stdout, stage
