"""Files `lm` reads and writes: checkpoints (`checkpoints.py`), the class a checkpoint or recipe names
(`class_paths.py`) and atomic writes that a kill never leaves half done (`files.py`)."""
