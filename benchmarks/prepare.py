"""Data pipeline speed: cleaning, near-dedup, tokenizer training and encoding on ~50 MB, and the
WikiText-2-sized prepare cold vs warm.

    nice -n 5 python benchmarks/prepare.py                  # ~50 MB, all stages (a few minutes on 2 cores)
    nice -n 5 python benchmarks/prepare.py --mb 10 --skip-wikitext

The corpus is generated in a temporary folder (never in the repository) from the shared corpora in
../shared/data: their documents, repeated with ~10% of the words replaced per copy (so copies are
distinct to MinHash at the default threshold), plus 5% exact and 5% near duplicates (two words
changed), shuffled. Prints MB/s per stage (MB = 10^6 UTF-8 bytes of input text) and the CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def seed_documents() -> list[str]:
    """Documents of every shared corpus found (articles, paragraphs, JSON records' text)."""
    import json

    from lm.data.preparation.sources import read_text_documents

    docs: list[str] = []
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        path = SHARED / "wikitext-2-raw-v1" / name
        if path.is_file():
            docs += list(read_text_documents(path))
    for path in [SHARED / "tinyshakespeare" / "input.txt", *SHARED.glob("rt-polarity/*.*"), *SHARED.glob("sst2-stsa-binary/*.*")]:
        if path.is_file() and path.suffix != ".md":
            text = path.read_text(encoding="utf-8", errors="replace")
            lines = text.split("\n\n") if "shakespeare" in str(path) else text.splitlines()
            docs += ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    alpaca = SHARED / "alpaca-en-demo" / "alpaca_en_demo.json"
    if alpaca.is_file():
        docs += [" ".join(str(v) for v in row.values()) for row in json.loads(alpaca.read_text())]
    if not docs:
        sys.exit(f"No shared corpora found under {SHARED}")
    return [d for d in docs if d.strip()]


def generate_corpus(folder: Path, target_mb: float, seed: int = 0) -> tuple[Path, int]:
    """Write ~target_mb of JSON-lines documents; returns (file, number of documents)."""
    import json

    rng = random.Random(seed)
    seeds = seed_documents()
    vocab = sorted({w for d in seeds[:2000] for w in d.split()})
    path, size, count = folder / "corpus.jsonl", 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target_mb * 1e6:
            doc = rng.choice(seeds)
            words = doc.split(" ")
            for i in rng.sample(range(len(words)), max(1, len(words) // 10)):
                words[i] = rng.choice(vocab)
            text = " ".join(words)
            copies = [text]
            if rng.random() < 0.05:
                copies.append(text)  # exact duplicate
            if rng.random() < 0.05 and len(words) > 40:
                near = text.split(" ")
                for i in rng.sample(range(len(near)), 2):
                    near[i] = rng.choice(vocab)
                copies.append(" ".join(near))  # near duplicate
            for copy in copies:
                line = json.dumps({"text": copy}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(copy.encode("utf-8"))
                count += 1
    return path, count


CPU_SECONDS: list[float] = []  # CPU time (this process + finished children) of each timed call


def timed(fn):
    """(result, wall seconds); also records the CPU seconds, a figure less bent by other load on the machine."""
    import resource

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    start, start_cpu = time.perf_counter(), cpu()
    result = fn()
    CPU_SECONDS.append(cpu() - start_cpu)
    return result, time.perf_counter() - start


def cpu_note() -> str:
    return f"[cpu {CPU_SECONDS[-1]:.2f} s]"


def bench_stages(corpus: Path, train_mb: float, vocab_size: int) -> None:
    from lm.data.token_cache import ShardWriter, token_dtype
    from lm.data.preparation.clean import CleaningOptions, CleaningReport, clean_documents
    from lm.data.preparation.dedup import NearDeduplicator
    from lm.data.preparation.encode import encode_to_shards
    from lm.data.preparation.sources import FileSource
    from lm.data.tokenizer import Tokenizer

    source = FileSource((str(corpus),))
    docs, seconds = timed(lambda: list(source.documents()))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"read JSONL             {mb:7.1f} MB  {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  ({len(docs)} documents) {cpu_note()}")
    report = CleaningReport()
    cleaned, seconds = timed(lambda: list(clean_documents(docs, CleaningOptions(), report)))
    print(f"clean (NFC, trim, exact dedup) {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  removed {dict(report.removed)} {cpu_note()}")
    near = NearDeduplicator(CleaningOptions(near_dedup=True))
    flags, seconds = timed(lambda: [near.seen(d) for d in cleaned])
    near_mb = sum(len(d.encode("utf-8")) for d in cleaned) / 1e6
    print(f"near dedup (MinHash-LSH, 128 perm, 5-grams, J>=0.8) on {near_mb:.1f} MB: {seconds:6.2f} s  "
          f"{near_mb / seconds:7.1f} MB/s  removed {sum(flags)} {cpu_note()}")  # fmt: skip
    subset, size = [], 0
    for d in cleaned:
        if size >= train_mb * 1e6:
            break
        subset.append(d)
        size += len(d.encode("utf-8"))
    tokenizer, seconds = timed(lambda: Tokenizer.train(subset, vocab_size=vocab_size))
    print(f"tokenizer training (bpe {vocab_size}) on {size / 1e6:.1f} MB: {seconds:6.2f} s  {size / 1e6 / seconds:7.1f} MB/s {cpu_note()}")
    with tempfile.TemporaryDirectory() as out:
        for num_proc in (1, 2):
            writer = ShardWriter(Path(out), token_dtype(tokenizer.vocab_size))
            counts, seconds = timed(lambda: encode_to_shards(((d, True) for d in cleaned), tokenizer, writer, num_proc=num_proc))
            writer.close()
            print(f"encode, {num_proc} process(es)    {counts.num_bytes / 1e6:6.1f} MB  {seconds:6.2f} s  "
                  f"{counts.num_bytes / 1e6 / seconds:7.1f} MB/s  ({counts.num_tokens:,} tokens) {cpu_note()}")  # fmt: skip
    bench_raw_tokenizer(tokenizer, cleaned)


def bench_raw_tokenizer(tokenizer, docs: list[str]) -> None:
    """The ceiling: the bare `tokenizers` call on one thread (this process: glibc's malloc), no pipeline."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust side at every call
    try:
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        _, seconds = timed(lambda: [tokenizer.encode_batch(docs[i : i + 256]) for i in range(0, len(docs), 256)])
        print(f"tokenizers alone, 1 thread, glibc malloc: {mb:6.1f} MB  {seconds:6.2f} s  {mb / seconds:7.1f} MB/s {cpu_note()}")
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def bench_wikitext(repeats: int) -> None:
    """The offline WikiText-2 protocol through TextDataModule: cold (empty cache) and warm prepare_data."""
    from lm.data import TextDataModule

    folder = SHARED / "wikitext-2-raw-v1"
    if not (folder / "wiki.valid.raw").is_file():
        print(f"WikiText-2 not found in {folder}: skipped")
        return
    cold, warm, cold_cpu, warm_cpu = [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            kwargs = dict(train_files=[str(folder / "wiki.valid.raw")], val_fraction=0.1,
                          test_files=[str(folder / "wiki.test.raw")], vocab_size=8192, cache_dir=cache)  # fmt: skip
            cold.append(timed(lambda: TextDataModule(**kwargs).prepare_data())[1])
            cold_cpu.append(CPU_SECONDS[-1])
            warm.append(timed(lambda: TextDataModule(**kwargs).prepare_data())[1])
            warm_cpu.append(CPU_SECONDS[-1])
    print(f"WikiText-2 offline prepare (train BPE 8192, tokenize 3 splits): cold {statistics.median(cold):.2f} s "
          f"(runs {', '.join(f'{c:.2f}' for c in cold)}), warm {statistics.median(warm):.3f} s "
          f"(runs {', '.join(f'{w:.3f}' for w in warm)}); CPU seconds cold {statistics.median(cold_cpu):.2f}, "
          f"warm {statistics.median(warm_cpu):.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the generated corpus")
    parser.add_argument("--train-mb", type=float, default=20.0, help="text used for tokenizer training")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="WikiText-2 cold/warm runs")
    parser.add_argument("--skip-wikitext", action="store_true")
    args = parser.parse_args()
    from lm.runtime.hardware import describe_cpu

    print(f"CPU: {describe_cpu()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}")
    if not args.skip_wikitext:
        bench_wikitext(args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        corpus, count = generate_corpus(Path(folder), args.mb)
        print(f"generated {count} documents, {corpus.stat().st_size / 1e6:.1f} MB of JSONL in {folder}")
        bench_stages(corpus, args.train_mb, args.vocab_size)
    print(f"load average after: {os.getloadavg()[0]:.1f} (a shared machine: figures are noisy)")


if __name__ == "__main__":
    main()
