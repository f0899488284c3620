"""The machine a run is on: what the CPU does fast and which precision that picks (`hardware.py`), and how
the process allocates large tensors (`allocator.py`)."""
