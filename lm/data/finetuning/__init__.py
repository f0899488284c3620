"""Fine-tuning datasets: Alpaca-style instructions (`instruction_data.py`), labelled sentences for a classifier
(`classification_data.py`) and the prompt templates training and generation share (`templates.py`)."""
