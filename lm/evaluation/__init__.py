"""Scoring: the token losses (`token_losses.py`, plain torch) and the token-weighted loss/perplexity/bits-per-byte
metrics made of them (`token_metrics.py`, torchmetrics) shared by training and `lm eval`, a raw text file scored every byte (`perplexity.py`), generated answers (`generation_metrics.py`),
a classifier on a labelled file (`labelled_file.py`) and TensorBoard runs compared (`run_report.py`, `lm report`)."""
