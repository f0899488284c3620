"""Scoring: token-weighted loss/perplexity/bits-per-byte metrics shared by training and `lm eval`
(`token_metrics.py`), a raw text file scored every byte (`perplexity.py`), generated answers (`generation_metrics.py`),
a classifier on a labelled file (`labelled_file.py`) and TensorBoard runs compared (`run_report.py`, `lm report`)."""
