"""``TextDataModule``: text files or WikiText in, batches of ``(input_ids, targets)`` out.

The pipeline, each step cached on disk under ``cache_dir`` and keyed by everything it depends on::

    sources -> documents -> clean/dedupe -> [carve validation tail] -> train BPE (train split only)
            -> tokenize each split into a memmap -> random windows (train) / sequential windows (eval)

``prepare_data`` (Lightning runs it once per node, on local rank 0) does all expensive work.
``setup`` (every rank) only reads the cache: it never trains a tokenizer or tokenizes, so DDP ranks
cannot race or disagree.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lm.data.clean import clean_documents
from lm.data.sources import FileSource, HubSource, TextSource, carve_tail
from lm.data.tokenizer import EOT, NUM_BYTE_TOKENS, Tokenizer
from lm.data.tokens import (
    EpochDistributedSampler,
    EvalDistributedSampler,
    RandomWindowDataset,
    ResumableDataLoader,
    SequentialWindowDataset,
    cache_key,
    get_or_build_tokens,
    load_cached_tokens,
    sha256_text,
)
from lm.errors import LMError, MissingFileError

logger = logging.getLogger("lm.data")

SPLITS = ("train", "val", "test")
_HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_WIKI_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
# Which splits each Trainer entry point needs (None: used without a Trainer, prepare everything).
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val", "test"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
    None: ("train", "val", "test"),
}
_Documents = tuple[list[str], bool]  # (documents, put end-of-text after the last one)


def _file_list(files: Sequence[str] | str | None) -> list[str] | None:
    """One path or a list of paths (``--data.train_files a.txt`` or ``[a.txt, b.txt]``) as a list."""
    if not files:
        return None
    return [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


class TextDataModule(L.LightningDataModule):
    """Language-modeling data: WikiText from the Hub, a local WikiText folder, or any text files.

    Where each split comes from, by priority:

    * ``train_files`` / ``val_files`` / ``test_files``: any UTF-8 text files (a file in WikiText
      format is split into articles; any other file is one document);
    * else ``data_dir``: a folder holding ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``
      (validation and test are optional there);
    * else, when no local path is given at all, WikiText from the Hugging Face Hub
      (``hub_name`` / ``hub_config``).

    With ``val_fraction > 0`` the validation split is carved off the end of the training text
    instead (at a line boundary, before the tokenizer is trained, so validation text never shapes
    the vocabulary). Offline, "train on wiki.valid.raw, validate on its last 10%, test on
    wiki.test.raw" is::

        lm fit --data.train_files [wiki.valid.raw] --data.val_fraction 0.1 --data.test_files [wiki.test.raw]

    Args:
        data_dir: Local folder with WikiText ``wiki.{train,valid,test}.raw`` files.
        train_files: Text files for training (override ``data_dir``'s training file); one path or a list.
        val_files: Text files for validation (cannot be combined with ``val_fraction``).
        test_files: Text files for testing.
        hub_name: Hugging Face dataset used when no local path is given.
        hub_config: Config of ``hub_name``, e.g. ``wikitext-2-raw-v1`` or ``wikitext-103-raw-v1``.
        val_fraction: Fraction in [0, 1) of the training text held out (from its end) for
            validation. 0 uses ``val_files`` / the source's own validation split, if any.
        tokenizer_path: A ``tokenizer.json`` to use instead of training one on the training split.
        vocab_size: Vocabulary size of the model: the tokenizer is trained up to this size (it can
            end up smaller on a small corpus) and must never exceed it. Link the model's vocabulary
            size to this value.
        min_frequency: Minimum count of a pair for a BPE merge.
        special_tokens: Special tokens added to the vocabulary; ``<|endoftext|>`` separates documents.
        block_size: Context length: tokens per training/evaluation window.
        batch_size: Training batch size (per device).
        eval_batch_size: Validation/test batch size (per device); defaults to ``batch_size``.
        samples_per_epoch: Random windows per training epoch (over all devices); defaults to
            ``num_train_tokens // block_size`` (about one pass over the training tokens).
        num_workers: DataLoader worker processes (0: load in the main process; windows from a memmap
            are cheap, so 0 is usually right).
        pin_memory: Pin host memory for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        clean: NFC-normalize, strip trailing whitespace, collapse blank lines, drop empty and
            duplicate documents. False keeps the text byte for byte.
        cache_dir: Where tokenizers and token memmaps are cached (relative paths: to the current
            working directory).
        seed: Seed for the random training windows (a run is reproducible for a given seed).
        prompts: Prompts for ``predict`` (each a string).
        prompts_file: File with one prompt per line for ``predict`` (added after ``prompts``).
        predict_batch_size: Prompts per ``predict`` batch.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        test_files: list[str] | str | None = None,
        hub_name: str = "Salesforce/wikitext",
        hub_config: str = "wikitext-2-raw-v1",
        val_fraction: float = 0.0,
        tokenizer_path: str | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (EOT,),
        block_size: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        clean: bool = True,
        cache_dir: str = ".cache/lm",
        seed: int = 1234,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        predict_batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        special_tokens = list(special_tokens)
        if not 0.0 <= val_fraction < 1.0:
            raise LMError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if val_fraction > 0 and val_files:
            raise LMError("Pass either val_files or val_fraction > 0, not both.")
        minimum_vocab = NUM_BYTE_TOKENS + len(special_tokens)
        if vocab_size < minimum_vocab:
            raise LMError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs {NUM_BYTE_TOKENS} byte "
                f"tokens plus {len(special_tokens)} special tokens, so at least {minimum_vocab}."
            )
        for name, value in [("block_size", block_size), ("batch_size", batch_size), ("min_frequency", min_frequency),
                            ("predict_batch_size", predict_batch_size)]:  # fmt: skip
            if value < 1:
                raise LMError(f"{name} must be >= 1, got {value}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise LMError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise LMError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}.")
        if num_workers < 0:
            raise LMError(f"num_workers must be >= 0, got {num_workers}.")

        self.data_dir = data_dir
        self.train_files = _file_list(train_files)
        self.val_files = _file_list(val_files)
        self.test_files = _file_list(test_files)
        self.hub_name = hub_name
        self.hub_config = hub_config
        self.val_fraction = val_fraction
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.special_tokens = special_tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.clean = clean
        self.cache_dir = Path(cache_dir).expanduser().resolve()  # fixed now: prepare and setup agree
        self.seed = seed
        self.prompts = list(prompts) if prompts else None
        self.prompts_file = prompts_file
        self.predict_batch_size = predict_batch_size

        self.tokenizer: Tokenizer | None = None
        self.tokenizer_file: Path | None = None  # the tokenizer.json in use (given, or in the cache)
        self._given_tokenizer: Tokenizer | None = None  # from set_tokenizer(), e.g. out of a checkpoint
        self.num_tokens: dict[str, int] = {}  # per split, after prepare_data/setup
        self.num_bytes: dict[str, int] = {}  # UTF-8 bytes of text per split (for bits-per-byte)
        self.train_dataset: RandomWindowDataset | None = None
        self.val_dataset: SequentialWindowDataset | None = None
        self.test_dataset: SequentialWindowDataset | None = None

    # ------------------------------------------------------------------ public helpers

    @property
    def has_validation(self) -> bool:
        """Whether ``fit`` will validate (val_files, a validation split in the source, or val_fraction > 0).

        Known from the arguments alone, before any data is read (e.g. to decide what a checkpoint
        callback should monitor).
        """
        try:
            return self._has_split("val")
        except FileNotFoundError:  # a missing data_dir is reported by prepare_data
            return False

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use this tokenizer instead of ``tokenizer_path`` or training one.

        For evaluating or resuming from a checkpoint: the data must be tokenized with the
        checkpoint's own tokenizer. Call before ``prepare_data``/``setup``; the token cache is keyed
        by the tokenizer, so this never reuses ids made by another one.
        """
        self._check_vocab(tokenizer, "The given tokenizer")
        self._given_tokenizer = tokenizer
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Train or load the tokenizer and tokenize the splits the current entry point needs.

        Runs on one process per node; all results go to the cache, nothing is kept on ``self``
        except sizes (Lightning does not carry state from ``prepare_data`` to other ranks).
        """
        stage = self._trainer_stage()
        if stage == "predict":
            return  # prompts need no preparation; the tokenizer comes from setup or the checkpoint
        splits = self._splits_for(stage)
        memo: dict[str, _Documents] = {}
        tokenizer = self._tokenizer(memo, build=True)
        for split in splits:
            self._tokens(split, tokenizer, memo, build=True)

    def setup(self, stage: str) -> None:
        """Load the tokenizer and memory-map the token cache (every rank; never trains or tokenizes)."""
        if stage == "predict":
            if self.tokenizer is None and (self.tokenizer_path or self._has_training_source()):
                try:
                    self.tokenizer = self._tokenizer({}, build=False)
                except (FileNotFoundError, RuntimeError) as err:
                    logger.info("No tokenizer for predict from the data settings (%s); the model must supply one.", err)
            return
        self.tokenizer = self._tokenizer({}, build=False)
        splits = self._splits_for(stage)
        if stage == "fit" and "val" not in splits:
            logger.info(
                "No validation data (no val_files, no validation split in the source, val_fraction=0): "
                "training runs without validation. Set --data.val_fraction or --data.val_files to add it."
            )
        pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        for split in splits:
            if split == "test" and stage == "fit":
                continue  # prepared by prepare_data for convenience; loaded when testing
            tokens = self._tokens(split, self.tokenizer, {}, build=False)
            if split == "train":
                num_samples = self.samples_per_epoch or max(1, len(tokens) // self.block_size)
                self.train_dataset = RandomWindowDataset(tokens, self.block_size, num_samples, seed=self.seed)
            elif split == "val":
                self.val_dataset = SequentialWindowDataset(tokens, self.block_size, pad_id=pad_id)
            else:
                self.test_dataset = SequentialWindowDataset(tokens, self.block_size, pad_id=pad_id)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise LMError("train_dataloader() called before setup('fit').")
        # Our own DistributedSampler (Lightning keeps it instead of injecting one): same rank split as
        # Lightning's DistributedSampler(shuffle=False), and set_epoch reaches the dataset.
        num_replicas, rank = self._rank_split()
        sampler = EpochDistributedSampler(
            self.train_dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
            drop_last=False,
        )
        loader = ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= self.batch_size,  # fixed shapes (torch.compile) when possible
            **self._loader_kwargs(),
        )
        # Checkpoints record how far into the epoch training got (exact mid-epoch resume).
        loader.progress_fn = self._train_batches_consumed
        return loader

    def _train_batches_consumed(self) -> int:
        """Training batches the trainer has run this epoch (what a checkpoint must not replay)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_dataset is None:
            return []  # Lightning skips validation for an empty list
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise LMError(
                "No test data: pass --data.test_files, or --data.data_dir with a wiki.test.raw, "
                "(or no local paths at all to use the Hub)."
            )
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset: SequentialWindowDataset) -> DataLoader:
        """Every window once over all ranks, none repeated (see EvalDistributedSampler)."""
        num_replicas, rank = self._rank_split()
        sampler = EvalDistributedSampler(dataset, num_replicas=num_replicas, rank=rank)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **self._loader_kwargs())

    def _rank_split(self) -> tuple[int, int]:
        """(number of data-parallel processes, this one's rank): (1, 0) outside a distributed Trainer."""
        kwargs = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)

    def predict_dataloader(self) -> DataLoader:
        """Batches of raw prompt strings (``list[str]``); the model tokenizes them."""
        prompts = self.read_prompts()
        return DataLoader(prompts, batch_size=self.predict_batch_size, shuffle=False, collate_fn=list)

    def read_prompts(self) -> list[str]:
        """``prompts`` followed by the non-empty lines of ``prompts_file``."""
        prompts = list(self.prompts or [])
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise MissingFileError(f"prompts_file not found: {path}")
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise LMError("Nothing to predict: pass --data.prompts [...] or --data.prompts_file FILE.")
        return prompts

    # ------------------------------------------------------------------ sources

    def _has_training_source(self) -> bool:
        return bool(self.train_files or self.data_dir or not self._local())

    def _local(self) -> bool:
        return bool(self.data_dir or self.train_files or self.val_files or self.test_files)

    def _data_dir(self) -> Path:
        assert self.data_dir is not None
        path = Path(self.data_dir)
        if not path.is_dir():
            raise MissingFileError(
                f"data_dir not found: {path}. It should hold WikiText's wiki.train.raw, wiki.valid.raw and "
                "wiki.test.raw (download WikiText-2 raw from https://huggingface.co/datasets/Salesforce/wikitext), "
                "or pass files with --data.train_files / --data.val_files / --data.test_files."
            )
        return path

    def _source(self, split: str) -> TextSource | None:
        """Where ``split`` comes from; None if it has no source (a carved validation split included)."""
        files = {"train": self.train_files, "val": self.val_files, "test": self.test_files}[split]
        if files:
            return FileSource(tuple(files), option=f"--data.{split}_files")
        if split == "val" and self.val_fraction > 0:
            return None
        if self.data_dir:
            path = self._data_dir() / _WIKI_FILES[split]
            if split == "train" or path.is_file():  # a missing training file is reported when needed
                return FileSource((str(path),), option=f"--data.{split}_files")
            return None
        if not self._local():
            return HubSource(self.hub_name, self.hub_config, _HUB_SPLITS[split])
        return None

    def _has_split(self, split: str) -> bool:
        if split == "val" and self.val_fraction > 0:
            return self._source("train") is not None
        return self._source(split) is not None

    def _splits_for(self, stage: str | None) -> list[str]:
        if stage not in _STAGE_SPLITS:
            raise LMError(f"Unknown stage {stage!r}; expected one of {sorted(s for s in _STAGE_SPLITS if s)}.")
        splits = [s for s in _STAGE_SPLITS[stage] if self._has_split(s)]
        if stage == "fit" and "train" not in splits:
            raise LMError(
                "No training data: pass --data.train_files [...], --data.data_dir (with wiki.train.raw), or no "
                "local paths at all to download WikiText from the Hub."
            )
        for needed in ("val", "test"):
            if stage in ("validate", "test") and needed in _STAGE_SPLITS[stage] and needed not in splits:
                option = "--data.val_files or --data.val_fraction" if needed == "val" else "--data.test_files"
                raise LMError(f"No {needed} data for `{stage}`: pass {option}.")
        return splits

    def _documents(self, split: str, memo: dict[str, _Documents]) -> _Documents:
        """Cleaned documents of ``split`` (train and a carved val are produced together)."""
        if split in memo:
            return memo[split]
        if split in ("train", "val") and self.val_fraction > 0:
            source = self._required_source("train")
            docs = self._clean(source.documents(), "train", source)
            head, tail, cut_inside = carve_tail(docs, self.val_fraction)
            if not tail or not head:
                raise LMError(
                    f"val_fraction={self.val_fraction} leaves an empty {'validation' if not tail else 'training'} "
                    f"split ({sum(map(len, docs))} characters of training text in {len(docs)} documents)."
                )
            memo["train"], memo["val"] = (head, not cut_inside), (tail, True)
        else:
            source = self._required_source(split)
            memo[split] = (self._clean(source.documents(), split, source), True)
        return memo[split]

    def _required_source(self, split: str) -> TextSource:
        source = self._source(split)
        if source is None:
            raise LMError(f"No source for the {split} split.")
        return source

    def _clean(self, docs: list[str], split: str, source: TextSource) -> list[str]:
        cleaned = clean_documents(docs, clean=self.clean, dedupe=self.clean)
        if not cleaned:
            raise LMError(f"The {split} split is empty after cleaning (source: {source.describe()}).")
        if len(cleaned) < len(docs):
            logger.info("%s: kept %d of %d documents (empty or duplicate ones dropped)", split, len(cleaned), len(docs))
        return cleaned

    # ------------------------------------------------------------------ tokenizer

    def _tokenizer(self, memo: dict[str, _Documents], *, build: bool) -> Tokenizer:
        """Load ``tokenizer_path``, or the cached tokenizer for this training data (training it if ``build``)."""
        if self._given_tokenizer is not None:
            return self._given_tokenizer
        if self.tokenizer_path:
            tokenizer = Tokenizer.from_file(self.tokenizer_path)
            self.tokenizer_file = Path(self.tokenizer_path)
        elif not self._has_training_source():
            raise LMError(
                "No tokenizer: pass --data.tokenizer_path (the tokenizer.json of the training run; its path is "
                "logged when it is trained) or the training data (--data.train_files / --data.data_dir) so the "
                "cached tokenizer can be found."
            )
        else:
            path = self.tokenizer_file = self._tokenizer_cache_path()
            if path.is_file():
                tokenizer = Tokenizer.from_file(path)
                if build:
                    logger.info("Tokenizer cache hit: %s (%d tokens)", path, tokenizer.vocab_size)
            elif not build:
                raise LMError(
                    f"Tokenizer not found in the cache ({path}): prepare_data() must run before setup() "
                    "(Lightning's Trainer does this; call dm.prepare_data() when using the DataModule directly)."
                )
            else:
                docs, _ = self._documents("train", memo)
                logger.info(
                    "Training tokenizer (byte-level BPE, vocab_size=%d) on %d training documents ...",
                    self.vocab_size, len(docs),
                )  # fmt: skip
                start = time.perf_counter()
                tokenizer = Tokenizer.train(docs, self.vocab_size, self.min_frequency, self.special_tokens)
                tokenizer.save(path)
                logger.info(
                    "Trained tokenizer: %d tokens in %.2f s -> %s",
                    tokenizer.vocab_size, time.perf_counter() - start, path,
                )  # fmt: skip
                if tokenizer.vocab_size < self.vocab_size:
                    logger.info(
                        "The corpus supports only %d of the requested %d tokens; the model keeps vocab_size=%d "
                        "(unused embedding rows are harmless).",
                        tokenizer.vocab_size, self.vocab_size, self.vocab_size,
                    )  # fmt: skip
        self._check_vocab(tokenizer, f"The tokenizer {self.tokenizer_file}")
        return tokenizer

    def _check_vocab(self, tokenizer: Tokenizer, what: str) -> None:
        if tokenizer.vocab_size > self.vocab_size:
            raise LMError(
                f"{what} has {tokenizer.vocab_size} tokens but vocab_size is {self.vocab_size}: the model's "
                f"embedding would be too small. Set --data.vocab_size >= {tokenizer.vocab_size}."
            )

    def _tokenizer_cache_path(self) -> Path:
        key = cache_key({
            "kind": "tokenizer",
            "train": self._required_source("train").fingerprint(),
            "vocab_size": self.vocab_size,
            "min_frequency": self.min_frequency,
            "special_tokens": self.special_tokens,
            "clean": self.clean,
            "val_fraction": self.val_fraction,  # the tokenizer sees only the part left for training
        })  # fmt: skip
        return self.cache_dir / "tokenizers" / key / "tokenizer.json"

    # ------------------------------------------------------------------ tokens

    def _tokens(self, split: str, tokenizer: Tokenizer, memo: dict[str, _Documents], *, build: bool) -> np.ndarray:
        carved = split in ("train", "val") and self.val_fraction > 0
        source = self._required_source("train" if carved else split)
        payload: dict[str, Any] = {
            "kind": "tokens",
            "split": split,
            "source": source.fingerprint(),
            "val_fraction": self.val_fraction if carved else None,
            "clean": self.clean,
            "tokenizer": sha256_text(tokenizer.to_str()),
        }
        key = cache_key(payload)
        bin_path = self.cache_dir / "tokens" / f"{split}-{key}.bin"
        description = source.describe() + (f" [{'last' if split == 'val' else 'first'} "
                                           f"{self.val_fraction if split == 'val' else 1 - self.val_fraction:.0%}]"
                                           if carved else "")  # fmt: skip
        if build:
            tokens, meta = get_or_build_tokens(
                bin_path, split, tokenizer, lambda: self._documents(split, memo),
                meta={"split": split, "source": description, "key": key, "clean": self.clean},
            )  # fmt: skip
        else:
            loaded = load_cached_tokens(bin_path)
            if loaded is None:
                raise LMError(
                    f"Token cache for the {split} split not found ({bin_path}): prepare_data() must run before "
                    "setup() (Lightning's Trainer does this; call dm.prepare_data() when using the DataModule "
                    "directly)."
                )
            tokens, meta = loaded
        minimum = self.block_size + 1 if split == "train" else 2
        if len(tokens) < minimum:
            raise LMError(
                f"The {split} split has {len(tokens)} tokens, too few for block_size={self.block_size} "
                f"(need at least {minimum}; source: {description}). Use more text or a smaller --data.block_size."
            )
        self.num_tokens[split] = int(meta["num_tokens"])
        self.num_bytes[split] = int(meta["num_bytes"])
        return tokens

    # ------------------------------------------------------------------ helpers

    def _trainer_stage(self) -> str | None:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return None if fn is None else str(fn.value if hasattr(fn, "value") else fn)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            # Each new iterator draws a seed from its generator: a private one leaves torch's global RNG
            # (dropout) alone, so a resumed run draws the same dropout masks as an uninterrupted one.
            "generator": torch.Generator().manual_seed(self.seed),
        }
