"""Prepare data without Lightning: sources -> cleaning -> tokenizer -> sharded token cache + report.

:func:`prepare` is what ``TextDataModule.prepare_data`` and ``lm prepare`` run; it works on a
:class:`~lm.data.preparation.split_plan.DataPlan` and :class:`PrepareOptions` alone, so it is usable (and tested)
without a Trainer. Each split is cached under a key of everything that determines its ids::

    cache_dir/tokenizers/<key>/tokenizer.json    trained on the training split only
    cache_dir/tokens/<split>-<key>/              shards + manifest.json (the commit point)
    cache_dir/tokens/train-dropout-<key>/        BPE-dropout encodings of the training split, if asked for
                                                 (lm/data/preparation/dropout_variants.py)
    cache_dir/reports/<key>.json                 the data report of the prepare that built these splits
    cache_dir/.locks/<kind>-<key>.lock           who is building that tokenizer or split right now

A warm run reads manifests and opens memory maps, nothing else (and leaves the report alone: a run
that then fails on bad input changes nothing in the cache). A cold run streams each needed source once
through cleaning into a staging file (lm/data/preparation/staging.py), trains the tokenizer from it if
needed, and encodes each split into bounded shards: memory holds batches, never the corpus.

Two processes preparing the same data into one cache (two `lm fit` of a sweep started together, or the
nodes of a multi-node run) would delete each other's half-written shards. A cold run therefore first
takes a lock per cache key (`token_cache.cache_lock`): the tokenizer's, when it must be trained, then each
split's, in a fixed order. The second process logs that it waits for the first (its pid), then finds
the manifests the first committed and uses them: one good cache, built once. If the first dies, the
kernel releases its locks and the second builds what is still missing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.data.token_cache import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    TokenShards,
    cache_key,
    cache_lock,
    commit,
    read_manifest,
    sha256_text,
    start_build,
    token_dtype,
)
from lm.data.preparation.clean import CleaningOptions, CleaningReport, clean_documents
from lm.data.preparation.dropout_variants import (check_dropout_options, documents_from_tokens, dropout_tokenizer,
                                                   variant_folder)  # fmt: skip
from lm.data.preparation.encode import encode_to_shards
from lm.data.preparation.split_plan import DataPlan
from lm.data.preparation.staging import Span, StagedDocuments, carve_tail
from lm.data.tokenizer import EOT, Tokenizer
from lm.errors import LMError
from lm.io.files import atomic_write_text, check_writable_folder

logger = logging.getLogger("lm.data")

_AUTO_PROC_CHARS = 32 << 20  # below ~32 MB of text, worker start-up costs more than it saves


@dataclass
class TokenizerOptions:
    """How the tokenizer is obtained: ``path`` to a ``tokenizer.json``, else trained with these settings."""

    kind: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    special_tokens: list[str] = field(default_factory=lambda: [EOT])
    path: str | None = None


@dataclass
class PrepareOptions:
    """Everything besides the plan that decides (or speeds up) preparation."""

    cache_dir: Path
    cleaning: CleaningOptions | None = field(default_factory=CleaningOptions)  # None: keep text as is
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    num_proc: int | None = None  # encoding processes; None: 1, or one per CPU for large corpora
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    bpe_dropout: float = 0.0  # > 0: also encode the training split bpe_dropout_variants times with BPE-dropout
    bpe_dropout_variants: int = 4


@dataclass
class PreparedSplit:
    folder: Path
    manifest: dict[str, Any]

    def tokens(self) -> TokenShards:
        return TokenShards.open(self.folder, self.manifest)


@dataclass
class Prepared:
    """The result: the tokenizer, each split's cache folder and manifest, and the data report."""

    tokenizer: Tokenizer
    tokenizer_file: Path | None
    splits: dict[str, PreparedSplit]
    report: dict[str, Any]
    report_file: Path | None = None
    train_variants: list[PreparedSplit] = field(default_factory=list)  # BPE-dropout encodings of "train"


def prepare(
    plan: DataPlan, splits: list[str], options: PrepareOptions, tokenizer: Tokenizer | None = None, *,
    build: bool = True,
) -> Prepared:  # fmt: skip
    """Prepare ``splits`` (or, with ``build=False``, only open what a previous prepare left)."""
    start = time.perf_counter()
    tokenizer_file = None
    if tokenizer is None:
        tokenizer, tokenizer_file = known_tokenizer(plan, options)
    ready = _ready_splits(plan, splits, options, tokenizer) if tokenizer is not None else {}
    seconds: dict[str, float] = {}
    built = False
    if len(ready) < len(splits):
        if not build:
            missing = ", ".join(s for s in splits if s not in ready) if tokenizer is not None else "tokenizer"
            raise LMError(
                f"Data not prepared ({missing}) in {options.cache_dir}: prepare_data() must run before setup() "
                "(Lightning's Trainer does this; call dm.prepare_data() when using the DataModule directly, "
                "or run `lm prepare` first)."
            )
        check_writable_folder(options.cache_dir, "data cache folder", "--data.cache_dir DIR")
        with ExitStack() as locks:
            tokenizer, tokenizer_file, ready, built = _build_locked(plan, splits, options, tokenizer, tokenizer_file,
                                                                    locks, seconds)  # fmt: skip
    if not built:
        for split, prepared in ready.items():
            logger.info("Token cache hit: %s (%d tokens)", prepared.folder, prepared.manifest["num_tokens"])
    variants: list[PreparedSplit] = []
    if options.bpe_dropout > 0 and "train" in ready:  # after the splits' locks are released (see _dropout_variants)
        variants, built_variants = _dropout_variants(ready["train"], tokenizer, options, build, seconds)
        built = built or built_variants
    seconds["total"] = time.perf_counter() - start
    report = make_report(tokenizer, tokenizer_file, ready, seconds, variants)
    report_file = _save_report(options.cache_dir, [*ready.values(), *variants], report, built) if build else None
    return Prepared(tokenizer, tokenizer_file, ready, report, report_file, variants)


def _build_locked(
    plan: DataPlan, splits: list[str], options: PrepareOptions, tokenizer: Tokenizer | None,
    tokenizer_file: Path | None, locks: ExitStack, seconds: dict[str, float],
) -> tuple[Tokenizer, Path | None, dict[str, PreparedSplit], bool]:  # fmt: skip
    """Take the cache keys' locks (waiting for a process building the same), look again at what is ready
    now, and build the rest: (tokenizer, its file, splits, whether anything was built here)."""
    ready: dict[str, PreparedSplit] = {}
    if tokenizer is None:
        key = tokenizer_cache_path(plan, options).parent.name
        locks.enter_context(cache_lock(options.cache_dir, f"tokenizer-{key}"))
        tokenizer, tokenizer_file = known_tokenizer(plan, options)  # trained meanwhile by the process waited for?
    if tokenizer is not None:
        ready = _lock_splits(plan, splits, options, tokenizer, locks)
        if len(ready) == len(splits):
            return tokenizer, tokenizer_file, ready, False
    with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix=".staging-") as staging:
        tokenizer, trained_file, ready = _build(plan, splits, options, tokenizer, ready, Path(staging), seconds, locks)
    return tokenizer, trained_file or tokenizer_file, ready, True  # a tokenizer found in the cache keeps its path


def _lock_splits(
    plan: DataPlan, splits: list[str], options: PrepareOptions, tokenizer: Tokenizer, locks: ExitStack
) -> dict[str, PreparedSplit]:
    """Lock every split's cache folder (in name order: two processes never wait for each other in a circle),
    then read which are ready."""
    for folder in sorted(split_folder(plan, split, options, tokenizer).name for split in splits):
        locks.enter_context(cache_lock(options.cache_dir, f"tokens-{folder}"))
    return _ready_splits(plan, splits, options, tokenizer)


def _build(
    plan: DataPlan, splits: list[str], options: PrepareOptions, tokenizer: Tokenizer | None,
    ready: dict[str, PreparedSplit], staging: Path, seconds: dict[str, float], locks: ExitStack,
) -> tuple[Tokenizer, Path | None, dict[str, PreparedSplit]]:  # fmt: skip
    """Stage what is missing, train the tokenizer if needed, then encode and commit each missing split."""
    needed = [s for s in splits if s not in ready] if tokenizer is not None else list(splits)
    if tokenizer is None and "train" not in needed:
        needed = ["train", *needed]  # the tokenizer is trained on the training split
    spans, reports = _stage(plan, needed, options, staging, seconds)
    tokenizer_file = None
    if tokenizer is None:
        tokenizer, tokenizer_file = _train_tokenizer(plan, options, spans["train"], seconds)
        ready = _lock_splits(plan, splits, options, tokenizer, locks)  # the same tokenizer may exist already
    for split in splits:
        if split not in ready:
            ready[split] = _build_split(plan, split, options, tokenizer, spans[split], reports[split], seconds)
    return tokenizer, tokenizer_file, {s: ready[s] for s in splits}


def _stage(
    plan: DataPlan, splits: list[str], options: PrepareOptions, staging: Path, seconds: dict[str, float]
) -> tuple[dict[str, Span], dict[str, CleaningReport]]:
    """Clean each needed source once into a staging file; carve validation off the training text."""
    spans: dict[str, Span] = {}
    reports: dict[str, CleaningReport] = {}
    for split in splits:
        name = "train" if split == "val" and plan.carved else split
        if name in reports:
            reports[split] = reports[name]
            continue
        source = plan.source(split)
        report = CleaningReport()
        start = time.perf_counter()
        staged = StagedDocuments(staging / f"{name}.txt", clean_documents(source.documents(), options.cleaning, report))
        report.seconds["read_and_clean"] = time.perf_counter() - start
        seconds[f"clean_{name}"] = report.seconds["read_and_clean"]
        if len(staged) == 0:
            raise LMError(f"The {name} split is empty after cleaning (source: {source.describe()}).")
        if report.documents_out < report.documents_in:
            logger.info("%s: kept %d of %d documents (removed: %s)", name, report.documents_out, report.documents_in,
                        dict(report.removed))  # fmt: skip
        reports[name] = reports[split] = report
        if name == "train" and plan.carved:
            spans["train"], spans["val"] = _carve(staged, plan.val_fraction)
        else:
            spans[name] = staged.whole()
    return spans, reports


def _carve(staged: StagedDocuments, fraction: float) -> tuple[Span, Span]:
    head, tail = carve_tail(staged, fraction)
    if not head.num_documents or not tail.num_documents:
        raise LMError(
            f"val_fraction={fraction} leaves an empty {'validation' if not tail.num_documents else 'training'} "
            f"split ({staged.num_chars} characters of training text in {len(staged)} documents)."
        )
    return head, tail


def known_tokenizer(plan: DataPlan, options: PrepareOptions) -> tuple[Tokenizer | None, Path | None]:
    """The tokenizer from ``options.tokenizer.path`` or the cache; (None, None) when it must be trained."""
    if options.tokenizer.path:
        return Tokenizer.from_file(options.tokenizer.path), Path(options.tokenizer.path)
    if not plan.has_split("train"):
        raise LMError(
            "No tokenizer: pass --data.tokenizer_path (the tokenizer.json of the training run; its path is "
            "logged when it is trained) or the training data (--data.train_files / --data.data_dir) so the "
            "cached tokenizer can be found."
        )
    path = tokenizer_cache_path(plan, options)
    if path.is_file():
        tokenizer = Tokenizer.from_file(path)
        logger.info("Tokenizer cache hit: %s (%d tokens)", path, tokenizer.vocab_size)
        return tokenizer, path
    return None, None


def tokenizer_cache_path(plan: DataPlan, options: PrepareOptions) -> Path:
    settings = options.tokenizer
    key = cache_key({
        "kind": "tokenizer", "train": plan.source("train").fingerprint(), "tokenizer_kind": settings.kind,
        "vocab_size": settings.vocab_size, "min_frequency": settings.min_frequency,
        "special_tokens": settings.special_tokens, "cleaning": _cleaning_dict(options),
        "val_fraction": plan.val_fraction,  # the tokenizer sees only the part left for training
    })  # fmt: skip
    return options.cache_dir / "tokenizers" / key / "tokenizer.json"


def _train_tokenizer(
    plan: DataPlan, options: PrepareOptions, span: Span, seconds: dict[str, float]
) -> tuple[Tokenizer, Path]:
    settings = options.tokenizer
    logger.info("Training tokenizer (%s, vocab_size=%d) on %d training documents ...", settings.kind,
                settings.vocab_size, span.num_documents)  # fmt: skip
    start = time.perf_counter()
    tokenizer = Tokenizer.train(span.texts(), settings.vocab_size, settings.min_frequency, settings.special_tokens,
                                kind=settings.kind)  # fmt: skip
    path = tokenizer_cache_path(plan, options)
    tokenizer.save(path)
    seconds["tokenizer"] = time.perf_counter() - start
    logger.info("Trained tokenizer: %d tokens in %.2f s -> %s", tokenizer.vocab_size, seconds["tokenizer"], path)
    if tokenizer.vocab_size < settings.vocab_size:
        logger.info("The corpus supports only %d of the requested %d tokens; the model keeps vocab_size=%d "
                    "(unused embedding rows are harmless).", tokenizer.vocab_size, settings.vocab_size,
                    settings.vocab_size)  # fmt: skip
    return tokenizer, path


def _cleaning_dict(options: PrepareOptions) -> dict[str, Any] | None:
    return options.cleaning.to_dict() if options.cleaning is not None else None


def split_folder(plan: DataPlan, split: str, options: PrepareOptions, tokenizer: Tokenizer) -> Path:
    """The cache folder of ``split``: keyed by source, carve, cleaning and the tokenizer's hash."""
    key = cache_key({
        "kind": "tokens", "split": split, "source": plan.source(split).fingerprint(),
        "val_fraction": plan.val_fraction if plan.carved and split in ("train", "val") else None,
        "cleaning": _cleaning_dict(options), "tokenizer": sha256_text(tokenizer.to_str()),
    })  # fmt: skip
    return options.cache_dir / "tokens" / f"{split}-{key}"


def _ready_splits(
    plan: DataPlan, splits: list[str], options: PrepareOptions, tokenizer: Tokenizer
) -> dict[str, PreparedSplit]:
    ready = {}
    for split in splits:
        folder = split_folder(plan, split, options, tokenizer)
        manifest = read_manifest(folder)
        if manifest is not None:
            ready[split] = PreparedSplit(folder, manifest)
    return ready


def _build_split(
    plan: DataPlan, split: str, options: PrepareOptions, tokenizer: Tokenizer, span: Span,
    cleaning: CleaningReport, seconds: dict[str, float],
) -> PreparedSplit:  # fmt: skip
    """Encode one split into fresh shards and commit its manifest (last)."""
    folder = split_folder(plan, split, options, tokenizer)
    source = plan.source(split)
    description = source.describe() + (f" [{'last' if split == 'val' else 'first'} "
                                       f"{plan.val_fraction if split == 'val' else 1 - plan.val_fraction:.0%}]"
                                       if plan.carved and split in ("train", "val") else "")  # fmt: skip
    logger.info("Tokenizing %s (%s) ...", split, description)
    start = time.perf_counter()
    start_build(folder)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(folder, dtype, options.shard_tokens)
    total_chars = int(span.staged.chars[span.start : span.stop].sum()) + len(span.lead) + len(span.trail)
    try:
        counts = encode_to_shards(span, tokenizer, writer, num_proc=_num_proc(options, total_chars),
                                  total_chars=total_chars, description=f"tokenize {split}")  # fmt: skip
    except BaseException:
        writer.abort()  # no manifest: the next prepare rebuilds this folder
        raise
    shards = writer.close()
    seconds[f"encode_{split}"] = time.perf_counter() - start
    manifest = {
        "split": split, "source": description, "fingerprint": source.fingerprint(),
        "cleaning_options": _cleaning_dict(options), "cleaning": cleaning.to_dict(),
        "tokenizer_sha256": sha256_text(tokenizer.to_str()), "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id, "dtype": dtype.name, "shards": shards, "num_tokens": counts.num_tokens,
        "num_bytes": counts.num_bytes, "num_documents": span.num_documents,
        "seconds_encode": seconds[f"encode_{split}"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    commit(folder, manifest)
    logger.info("Tokenized %s: %d documents, %.2f MB -> %d tokens (%.2f bytes/token) in %.2f s -> %s", split,
                span.num_documents, counts.num_bytes / 1e6, counts.num_tokens,
                counts.num_bytes / max(counts.num_tokens, 1), seconds[f"encode_{split}"], folder)  # fmt: skip
    return PreparedSplit(folder, manifest)


def _dropout_variants(
    train: PreparedSplit, tokenizer: Tokenizer, options: PrepareOptions, build: bool, seconds: dict[str, float]
) -> tuple[list[PreparedSplit], bool]:
    """The BPE-dropout encodings of the training split: opened from the cache, or (with ``build``) encoded
    there; (variants, whether any was built here).

    Each variant has its own lock, taken alone: this runs after the splits' locks are released, so a process
    never waits for a variant while holding another lock (no waiting in a circle). A second process preparing
    the same data waits for the first, then finds its manifests, so every run on this cache reads the same
    variants: tokenizers' dropout is not seedable (lm/data/preparation/dropout_variants.py), the cache is the
    record."""
    check_dropout_options(options.bpe_dropout, options.bpe_dropout_variants)
    variants, built = [], False
    for index in range(options.bpe_dropout_variants):
        folder = variant_folder(options.cache_dir, train.folder, options.bpe_dropout, index)
        manifest = read_manifest(folder)
        if manifest is None and not build:
            raise LMError(f"Data not prepared (BPE-dropout variant {index} of the training split) in "
                          f"{options.cache_dir}: prepare_data() must run before setup() (or run `lm prepare` first).")
        if manifest is None:
            check_writable_folder(options.cache_dir, "data cache folder", "--data.cache_dir DIR")
            with cache_lock(options.cache_dir, f"tokens-{folder.name}"):
                manifest = read_manifest(folder)  # written meanwhile by the process waited for?
                if manifest is None:
                    manifest, built = _build_variant(train, tokenizer, options, index, folder, seconds), True
        else:
            logger.info("Token cache hit: %s (BPE-dropout %g, variant %d, %d tokens)", folder, options.bpe_dropout,
                        index, manifest["num_tokens"])  # fmt: skip
        variants.append(PreparedSplit(folder, manifest))
    return variants, built


def _build_variant(
    train: PreparedSplit, tokenizer: Tokenizer, options: PrepareOptions, index: int, folder: Path,
    seconds: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """Decode the canonical training split document by document, encode it again with BPE-dropout, commit."""
    dropped = dropout_tokenizer(tokenizer, options.bpe_dropout)
    canonical = train.manifest
    logger.info("Tokenizing train with BPE-dropout %g, variant %d (%d in all; no tiktoken fast path, no merge cache: "
                "slower than the canonical encoding) ...", options.bpe_dropout, index, options.bpe_dropout_variants)
    start = time.perf_counter()
    start_build(folder)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(folder, dtype, options.shard_tokens)
    pieces = documents_from_tokens(train.tokens(), tokenizer, tokenizer.eot_id)
    try:
        counts = encode_to_shards(pieces, dropped, writer, num_proc=_num_proc(options, canonical["num_bytes"]),
                                  total_chars=canonical["num_bytes"],  # bytes: close enough for a progress bar
                                  description=f"tokenize train, BPE-dropout {index}")  # fmt: skip
    except BaseException:
        writer.abort()  # no manifest: the next prepare rebuilds this folder
        raise
    shards = writer.close()
    seconds[f"encode_train_dropout_{index}"] = elapsed = time.perf_counter() - start
    if counts.num_bytes != canonical["num_bytes"]:  # the decoded text must be the encoded one
        logger.warning("BPE-dropout variant %d holds %d bytes of text, the canonical training split %d.", index,
                       counts.num_bytes, canonical["num_bytes"])  # fmt: skip
    manifest = {
        **{k: canonical[k] for k in ("split", "source", "fingerprint", "cleaning_options", "cleaning",
                                     "tokenizer_sha256", "vocab_size", "eot_id", "num_documents")},
        "bpe_dropout": options.bpe_dropout, "variant": index, "canonical": train.folder.name,
        "seeded": False,  # tokenizers draws the dropped merges from an unseedable RNG: this cache is the record
        "dtype": dtype.name, "shards": shards, "num_tokens": counts.num_tokens, "num_bytes": counts.num_bytes,
        "seconds_encode": elapsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    commit(folder, manifest)
    logger.info("Tokenized train with BPE-dropout %g, variant %d: %d tokens (canonical %d, %+.1f%%) in %.2f s -> %s",
                options.bpe_dropout, index, counts.num_tokens, canonical["num_tokens"],
                100 * (counts.num_tokens / max(canonical["num_tokens"], 1) - 1), elapsed, folder)  # fmt: skip
    return manifest


def _num_proc(options: PrepareOptions, total_chars: int) -> int:
    if options.num_proc is not None:
        return max(1, options.num_proc)
    return (os.cpu_count() or 1) if total_chars >= _AUTO_PROC_CHARS else 1


def make_report(
    tokenizer: Tokenizer, tokenizer_file: Path | None, splits: dict[str, PreparedSplit], seconds: dict[str, float],
    train_variants: list[PreparedSplit] | None = None,
) -> dict[str, Any]:
    """The data report: per split documents in/out, removals per step, PII, tokens, bytes/token, times;
    and the BPE-dropout encodings of the training split, if any."""
    report: dict[str, Any] = {"tokenizer": {"vocab_size": tokenizer.vocab_size, "file": str(tokenizer_file or "")},
                              "splits": {}, "seconds": {k: round(v, 3) for k, v in seconds.items()}}  # fmt: skip
    for split, prepared in splits.items():
        m = prepared.manifest
        report["splits"][split] = {
            "source": m["source"], **m["cleaning"], "tokens": m["num_tokens"], "bytes": m["num_bytes"],
            "documents": m["num_documents"], "bytes_per_token": round(m["num_bytes"] / max(m["num_tokens"], 1), 4),
            "shards": len(m["shards"]), "cache": str(prepared.folder),
        }  # fmt: skip
    if train_variants:
        report["train_variants"] = {
            "bpe_dropout": train_variants[0].manifest["bpe_dropout"], "seeded": False,
            "tokens": [v.manifest["num_tokens"] for v in train_variants],
            "bytes_per_token": [round(v.manifest["num_bytes"] / max(v.manifest["num_tokens"], 1), 4)
                                for v in train_variants],
            "cache": [str(v.folder) for v in train_variants],
        }  # fmt: skip
    return report


def _save_report(cache_dir: Path, splits: list[PreparedSplit], report: dict[str, Any], built: bool) -> Path:
    """Write the report of a prepare that built something (or of splits that have none yet). A cache hit
    leaves the existing one as it is: it describes the build, and a run that fails later must not touch it."""
    path = cache_dir / "reports" / f"{cache_key({'folders': sorted(p.folder.name for p in splits)})}.json"
    if built or not path.is_file():
        atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines (what ``lm prepare`` prints)."""
    lines = [f"tokenizer: {report['tokenizer']['vocab_size']} tokens ({report['tokenizer']['file']})"]
    for split, r in report["splits"].items():
        removed = ", ".join(f"{k} {v}" for k, v in r["removed"].items()) or "none"
        pii = ", ".join(f"{k} {v}" for k, v in r["pii_replaced"].items()) or "none"
        lines.append(
            f"{split:>5}: {r['documents']} documents; cleaning {r['documents_in']} in, {r['documents_out']} out (removed: {removed}; "
            f"PII replaced: {pii}); {r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['bytes_per_token']:.2f} "
            f"bytes/token, {r['shards']} shard(s) -> {r['cache']}"
        )
    variants = report.get("train_variants")
    if variants:
        lines.append(
            f"train, BPE-dropout {variants['bpe_dropout']:g}: {len(variants['tokens'])} variant(s) of "
            f"{', '.join(f'{n:,}' for n in variants['tokens'])} tokens ({', '.join(f'{b:.2f}' for b in variants['bytes_per_token'])} "
            f"bytes/token), read one per epoch in turn; not seeded (a re-prepare draws new ones) -> "
            f"{', '.join(variants['cache'])}"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)
