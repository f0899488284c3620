"""Offline preparation, no Lightning: which split comes from where (`split_plan.py`), documents streamed from
files or the hub (`sources.py`), cleaning and deduplication (`clean.py`, `dedup.py`), documents parked between
passes (`staging.py`), tokenizing into shards (`encode.py`, with `fast_bpe.py`), and the whole of it with its
report (`pipeline.py`, what `lm prepare` and `TextDataModule.prepare_data` run)."""
