"""Training-time loading: windows over the token stream, samplers and a resumable loader (`windows.py`), the
LitData streaming path (`litdata_chunks.py`) and the Lightning DataModule (`datamodule.py`)."""
