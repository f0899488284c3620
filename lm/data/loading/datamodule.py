"""``TextDataModule``: a thin Lightning layer from a prepared token cache to loaders.

All the work happens in :func:`lm.data.preparation.pipeline.prepare` (Lightning-free): ``prepare_data`` (one
process per node) runs it; ``setup`` (every rank) only opens what it wrote, so DDP ranks never race
or disagree. Training reads random windows from memory-mapped shards, or, with ``loader: litdata``,
streams LitData chunks (lm/data/loading/litdata_chunks.py); validation and test read every token once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lm.data.preparation.clean import CleaningOptions
from lm.data.preparation.dropout_variants import check_dropout_options
from lm.data.preparation.split_plan import DataPlan, file_list, make_plan
from lm.data.preparation.pipeline import PrepareOptions, TokenizerOptions, known_tokenizer, prepare
from lm.data.token_cache import cache_key, cache_lock
from lm.data.tokenizer import EOT, Tokenizer, minimum_vocab_size
from lm.data.loading.litdata_chunks import streaming_dataset, streaming_loader, write_chunks
from lm.data.loading.windows import (EpochDistributedSampler, EvalDistributedSampler, RandomWindowDataset, ResumableDataLoader,
                            SequentialWindowDataset, VariantWindowDataset, check_token_count)  # fmt: skip
from lm.errors import LMError, MissingFileError
from lm.io.files import check_folder_path

logger = logging.getLogger("lm.data")


class TextDataModule(L.LightningDataModule):
    """Language-modeling data from files, a WikiText folder or a Hugging Face dataset.

    Args:
        data_dir: Folder with WikiText ``wiki.{train,valid,test}.raw`` files.
        train_files: Training files or globs (text, ``.jsonl``, ``.parquet``); one path or a list.
        val_files: Validation files (cannot be combined with ``val_fraction``).
        test_files: Test files.
        text_field: JSONL field / Parquet or hub column holding the text.
        hub_name: Hugging Face dataset used when no local path is given (``Salesforce/wikitext``: the
            WikiText preset, articles rebuilt from lines).
        hub_config: Config of ``hub_name``, e.g. ``wikitext-2-raw-v1``.
        hub_streaming: Stream the hub dataset instead of downloading it first.
        val_fraction: Fraction in [0, 1) of the cleaned training text, counted in characters and cut
            at a line start, held out from its end for validation. It is cut before the tokenizer is
            trained, so validation text never shapes the vocabulary. 0: ``val_files`` or the source's
            own validation split, if any.
        clean: Apply ``cleaning``; False keeps the text byte for byte (the WikiText recipes: they are
            scored on the raw bytes).
        cleaning: Cleaning steps: normalization, filters, exact/near dedup, PII (see CleaningOptions).
            ``clean`` is the switch and ``cleaning`` the settings, and the two never contradict each
            other silently: ``clean: false`` with ``cleaning`` steps that differ from the defaults is
            refused before any data is read, naming the steps and both fixes. So an overlay that asks
            for cleaning says ``clean: true`` itself (experiments/data/jsonl_cleaned.yaml) and wins over
            a base recipe's ``clean: false`` by the usual rule, later wins; and a later
            ``--data.clean false`` must drop the overlay's steps (or the overlay) rather than leave them
            unapplied. A silent winner either way would be a trap: cleaning skipped (PII kept) or the
            promised raw bytes changed.
        tokenizer_kind: ``bpe`` (byte-level BPE), ``char``, ``word`` or ``unigram``.
        tokenizer_path: A ``tokenizer.json`` to use instead of training one on the training split.
        vocab_size: Vocabulary size of the model; the tokenizer is trained up to it (`lm fit` links the model's to it).
        min_frequency: Minimum count of a merge (bpe) or of a character/word (char/word) to enter the vocabulary.
        bpe_dropout: BPE-dropout for training (Provilkov et al., 2020), ``bpe`` tokenizers only: in [0, 1), the
            probability of skipping each merge. > 0: ``prepare`` also encodes the training split
            ``bpe_dropout_variants`` times with merges dropped at random (each a different segmentation of the
            same text, cached), and epoch ``e`` trains on variant ``e % bpe_dropout_variants``; validation and
            test stay the canonical encoding, so scores are unchanged in meaning. Not seeded (tokenizers' RNG
            cannot be): the cache is the record, and a re-prepare elsewhere draws other segmentations.
        bpe_dropout_variants: How many BPE-dropout encodings of the training split to prepare and cycle through.
        special_tokens: Special tokens; ``<|endoftext|>`` ends every document.
        cache_dir: Where tokenizers, token shards and reports are cached.
        num_proc: Tokenization processes (None: one, or one per CPU above ~32 MB of text).
        shard_tokens: Maximum token ids per shard file.
        loader: ``memmap`` (random windows from the shards) or ``litdata`` (LitData chunks, streamed).
        litdata_dir: Where LitData chunks are written and streamed from (a folder or an ``s3://`` URL);
            default: next to the training shards.
        block_size: Tokens per training/evaluation window. `lm fit` and `lm prepare` set it to the model's
            context (linked from ``model.config.max_position_embeddings``) and refuse it given.
        batch_size: Training batch size (per device).
        eval_batch_size: Validation/test batch size (per device); defaults to ``batch_size``.
        samples_per_epoch: Random windows per training epoch (over all devices); default about one pass.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        seed: Seed of the random training windows.
        prompts: Prompts for ``predict``.
        prompts_file: File with one prompt per line for ``predict`` (added after ``prompts``).
        predict_batch_size: Prompts per ``predict`` batch.
    """

    def __init__(
        self, data_dir: str | None = None, train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None, test_files: list[str] | str | None = None, text_field: str = "text",
        hub_name: str = "Salesforce/wikitext", hub_config: str | None = "wikitext-2-raw-v1", hub_streaming: bool = False,
        val_fraction: float = 0.0, clean: bool = True, cleaning: CleaningOptions | None = None,
        tokenizer_kind: Literal["bpe", "char", "word", "unigram"] = "bpe", tokenizer_path: str | None = None,
        vocab_size: int = 8192, min_frequency: int = 2, bpe_dropout: float = 0.0, bpe_dropout_variants: int = 4,
        special_tokens: list[str] | tuple[str, ...] = (EOT,),
        cache_dir: str = ".cache/lm", num_proc: int | None = None, shard_tokens: int = 1 << 27,
        loader: Literal["memmap", "litdata"] = "memmap", litdata_dir: str | None = None, block_size: int = 256,
        batch_size: int = 16, eval_batch_size: int | None = None, samples_per_epoch: int | None = None,
        num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False, seed: int = 1234,
        prompts: list[str] | None = None, prompts_file: str | None = None, predict_batch_size: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        _check_sizes(locals())
        _check_cleaning(clean, cleaning)
        _check_bpe_dropout(bpe_dropout, bpe_dropout_variants, tokenizer_kind, loader)
        check_folder_path(Path(cache_dir).expanduser(), "data cache folder", "--data.cache_dir DIR")
        if litdata_dir and "://" not in litdata_dir:
            check_folder_path(Path(litdata_dir).expanduser(), "LitData folder", "--data.litdata_dir DIR")
        self.files = {"train": file_list(train_files), "val": file_list(val_files), "test": file_list(test_files)}
        self.train_files, self.val_files, self.test_files = self.files["train"], self.files["val"], self.files["test"]
        self.data_dir, self.val_fraction, self.vocab_size = data_dir, val_fraction, vocab_size
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size or batch_size
        self.options = PrepareOptions(
            cache_dir=Path(cache_dir).expanduser().resolve(),  # fixed now: prepare and setup agree
            cleaning=(cleaning or CleaningOptions()) if clean else None, num_proc=num_proc, shard_tokens=shard_tokens,
            tokenizer=TokenizerOptions(tokenizer_kind, vocab_size, min_frequency, list(special_tokens), tokenizer_path),
            bpe_dropout=bpe_dropout, bpe_dropout_variants=bpe_dropout_variants,
        )  # fmt: skip
        self.plan_args = dict(data_dir=data_dir, files=self.files, hub_name=hub_name, hub_config=hub_config,
                              hub_streaming=hub_streaming, text_field=text_field, val_fraction=val_fraction)  # fmt: skip
        if not 0.0 <= val_fraction < 1.0 or (val_fraction > 0 and self.files["val"]):
            make_plan(**{**self.plan_args, "data_dir": None})  # raises the clear error now, not at prepare time
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_file: Path | None = None
        self._given_tokenizer: Tokenizer | None = None
        self.num_tokens: dict[str, int] = {}  # per split, after prepare_data/setup
        self.num_bytes: dict[str, int] = {}  # UTF-8 bytes of text per split (for bits-per-byte)
        self.report: dict[str, Any] | None = None
        self.report_file: Path | None = None
        self.train_dataset: Any = None
        self.val_dataset: SequentialWindowDataset | None = None
        self.test_dataset: SequentialWindowDataset | None = None

    @property
    def plan(self) -> DataPlan:
        return make_plan(**self.plan_args)

    @property
    def has_validation(self) -> bool:
        """Whether ``fit`` will validate; known from the arguments alone, before any data is read."""
        try:
            return self.plan.has_split("val")
        except MissingFileError:  # a missing data_dir is reported by prepare_data
            return False

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use this tokenizer (e.g. a checkpoint's) instead of training one; call before prepare_data/setup.
        A `tokenizer_path` given too must hold this very tokenizer: it would be ignored otherwise."""
        _check_vocab(tokenizer, self.vocab_size, "The given tokenizer")
        _check_same_tokenizer(self.options.tokenizer.path, tokenizer)
        self._given_tokenizer = self.tokenizer = tokenizer

    def prepare_data(self) -> None:
        """Clean, train or load the tokenizer, and tokenize what the current entry point needs (cached)."""
        stage = _trainer_stage(self)
        if stage != "predict":
            self._prepare(stage, build=True)

    def setup(self, stage: str) -> None:
        """Open the prepared cache (every rank; never trains or tokenizes) and build the datasets."""
        if stage == "predict":
            return self._setup_predict()
        prepared = self._prepare(stage, build=False)
        pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        if stage == "fit" and "val" not in prepared.splits:
            logger.info("No validation data (no val_files, no validation split in the source, val_fraction=0): "
                        "training runs without validation. Set --data.val_fraction or --data.val_files to add it.")
        for split, ready in prepared.splits.items():
            if split == "test" and stage == "fit":
                continue  # prepared by prepare_data for convenience; opened when testing
            tokens = ready.tokens()
            check_token_count(len(tokens), self.block_size, split, ready.manifest["source"])
            if split == "train":
                samples = self.hparams.samples_per_epoch or max(1, len(tokens) // self.block_size)
                self.train_dataset = RandomWindowDataset(tokens, self.block_size, samples, seed=self.hparams.seed)
                if prepared.train_variants:  # BPE-dropout: the same number of windows per epoch, cut from variant e % K
                    self.train_dataset = VariantWindowDataset([v.tokens() for v in prepared.train_variants],
                                                              self.block_size, samples, seed=self.hparams.seed)  # fmt: skip
            elif split == "val" or stage == "test":
                setattr(self, f"{split}_dataset", SequentialWindowDataset(tokens, self.block_size, pad_id=pad_id))
        if stage == "fit" and self.hparams.loader == "litdata":
            self.train_dataset = streaming_dataset(self._litdata_dir(prepared), self.block_size, self.hparams.seed)

    def _prepare(self, stage: str | None, *, build: bool) -> Any:
        plan = self.plan
        prepared = prepare(plan, plan.splits_for(stage), self.options, self._given_tokenizer, build=build)
        _check_vocab(prepared.tokenizer, self.vocab_size, f"The tokenizer {prepared.tokenizer_file}")
        self.tokenizer, self.tokenizer_file, self.report = prepared.tokenizer, prepared.tokenizer_file, prepared.report
        self.report_file = prepared.report_file or self.report_file
        for split, ready in prepared.splits.items():
            self.num_tokens[split], self.num_bytes[split] = ready.manifest["num_tokens"], ready.manifest["num_bytes"]
        if build and self.hparams.loader == "litdata" and "train" in prepared.splits:
            out = self._litdata_dir(prepared)  # one writer at a time: a second run waits, then finds the chunks
            with cache_lock(self.options.cache_dir, f"litdata-{cache_key({'dir': out, 'block': self.block_size})}"):
                write_chunks(prepared.splits["train"], out, self.block_size)
        return prepared

    def _litdata_dir(self, prepared: Any) -> str:
        return self.hparams.litdata_dir or str(prepared.splits["train"].folder / "litdata")

    def _setup_predict(self) -> None:
        if self.tokenizer is None and (self.options.tokenizer.path or self.plan.has_split("train")):
            self.tokenizer, self.tokenizer_file = known_tokenizer(self.plan, self.options)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise LMError("train_dataloader() called before setup('fit').")
        if self.hparams.loader == "litdata":
            return streaming_loader(self.train_dataset, self.batch_size, self.hparams.num_workers)
        # Our own DistributedSampler: Lightning keeps it instead of injecting one, and set_epoch reaches the dataset.
        num_replicas, rank = self._rank_split()
        sampler = EpochDistributedSampler(self.train_dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        loader = ResumableDataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler,
                                     drop_last=len(sampler) >= self.batch_size, **self._loader_kwargs())  # fmt: skip
        loader.progress_fn = self._train_batches_consumed  # checkpoints record the position inside the epoch
        return loader

    def _train_batches_consumed(self) -> int:
        """Training batches the trainer has run this epoch (what a checkpoint must not replay)."""
        return 0 if self.trainer is None else self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return [] if self.val_dataset is None else self._eval_loader(self.val_dataset)  # []: Lightning skips validation

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise LMError("No test data: pass --data.test_files, or --data.data_dir with a wiki.test.raw, "
                          "(or no local paths at all to use the Hub).")  # fmt: skip
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
        return DataLoader(self.read_prompts(), batch_size=self.hparams.predict_batch_size, shuffle=False, collate_fn=list)

    def read_prompts(self) -> list[str]:
        """``prompts`` followed by the non-empty lines of ``prompts_file``."""
        return read_prompts(self.hparams.prompts, self.hparams.prompts_file)

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.hparams.num_workers
        return {"num_workers": workers, "pin_memory": self.hparams.pin_memory,
                "persistent_workers": self.hparams.persistent_workers and workers > 0,
                # A private generator leaves torch's global RNG (dropout) alone: a resumed run draws the same masks.
                "generator": torch.Generator().manual_seed(self.hparams.seed)}  # fmt: skip


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """``prompts`` followed by the non-empty lines of ``prompts_file``; an error when there are none."""
    prompts = list(prompts or [])
    if prompts_file:
        if not Path(prompts_file).is_file():
            raise MissingFileError(f"prompts_file not found: {prompts_file}")
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LMError(f"prompts_file {prompts_file} is not valid UTF-8 text ({err}). Convert it to UTF-8 first.") from err
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LMError("Nothing to predict: pass --data.prompts [...] or --data.prompts_file FILE.")
    return prompts


def _check_sizes(args: dict[str, Any]) -> None:
    """Clear errors for sizes out of range, at construction (before any data is read)."""
    minimum = minimum_vocab_size(args["special_tokens"])
    if args["vocab_size"] < minimum:
        raise LMError(f"vocab_size={args['vocab_size']} is too small: a byte-level tokenizer needs 256 byte tokens "
                      f"plus {len(list(args['special_tokens']))} special tokens, so at least {minimum}.")  # fmt: skip
    for name in ("block_size", "batch_size", "min_frequency", "predict_batch_size", "shard_tokens"):
        if args[name] < 1:
            raise LMError(f"{name} must be >= 1, got {args[name]}.")
    for name in ("eval_batch_size", "samples_per_epoch", "num_proc"):
        if args[name] is not None and args[name] < 1:
            raise LMError(f"{name} must be >= 1, got {args[name]}.")
    if args["num_workers"] < 0:
        raise LMError(f"num_workers must be >= 0, got {args['num_workers']}.")


def _check_bpe_dropout(bpe_dropout: float, variants: int, tokenizer_kind: str, loader: str) -> None:
    """BPE-dropout settings that cannot work, refused at construction (before any data is read)."""
    check_dropout_options(bpe_dropout, variants)
    if bpe_dropout == 0:
        return
    if tokenizer_kind != "bpe":
        raise LMError(f"bpe_dropout drops BPE merges, but tokenizer_kind is {tokenizer_kind!r}: use "
                      "--data.tokenizer_kind bpe, or drop --data.bpe_dropout (0 switches it off).")
    if loader == "litdata":
        raise LMError("bpe_dropout is not supported with loader: litdata (its chunks are written from the canonical "
                      "training split only): use --data.loader memmap, or drop --data.bpe_dropout.")


def _check_cleaning(clean: bool, cleaning: CleaningOptions | None) -> None:
    """``clean: false`` while ``cleaning`` asks for steps: refused, since either reading of it betrays a setting
    (the steps would be skipped, or the raw bytes ``clean: false`` promises would change)."""
    if clean or cleaning is None:
        return
    defaults = CleaningOptions().to_dict()
    asked = {k: v for k, v in cleaning.to_dict().items() if v != defaults[k]}
    if asked:
        steps = ", ".join(f"{k}={v}" for k, v in asked.items())
        raise LMError(f"data.clean is false (keep the text byte for byte) but data.cleaning asks for steps ({steps}), "
                      f"which would not run. Set data.clean: true next to them (--data.clean true) to clean, or drop "
                      f"the data.cleaning settings (or the overlay that sets them) to keep the raw text.")


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise LMError(f"{what} has {tokenizer.vocab_size} tokens but vocab_size is {vocab_size}: the model's "
                      f"embedding would be too small. Set --data.vocab_size >= {tokenizer.vocab_size}.")  # fmt: skip


def _check_same_tokenizer(path: str | None, tokenizer: Tokenizer) -> None:
    """With `--ckpt_path`, the checkpoint's tokenizer is used (its weights read its ids): a `--data.tokenizer_path`
    naming another one is refused rather than silently ignored."""
    if not path:
        return
    named = Tokenizer.from_file(path)
    if named.to_str() == tokenizer.to_str():
        return
    sizes = (f"{named.vocab_size} tokens against {tokenizer.vocab_size}" if named.vocab_size != tokenizer.vocab_size
             else f"both {tokenizer.vocab_size} tokens, other ids")
    raise LMError(f"data.tokenizer_path {path} is not the tokenizer this model was trained with, which its checkpoint "
                  f"holds and lm uses ({sizes}): the option would be ignored. Drop --data.tokenizer_path, or pass "
                  f"the checkpoint's own tokenizer.json.")


def _trainer_stage(module: L.LightningDataModule) -> str | None:
    fn = getattr(getattr(getattr(module, "trainer", None), "state", None), "fn", None)
    return None if fn is None else str(getattr(fn, "value", fn))
