"""lm: build GPT-style language models from scratch with PyTorch Lightning.

Rooms: `lm.model` (the transformer, no Lightning), `lm.data` (corpus -> tokens -> batches),
`lm.modules` (LightningModules), `lm.cli.main` (the `lm` command).
"""

__version__ = "0.1.0"
