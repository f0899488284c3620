"""Making a trained GPT cheaper to run: int8 quantization (quantize.py) and pruning (prune.py)."""
