"""`lm finetune fit|validate|test`: the Lightning CLI for task fine-tuning.

The same CLI as `lm fit` (experiment names, logs/, checkpoints/, TensorBoard, `--ckpt_path` reloads,
YAML configs) with two differences: the model *and* the DataModule are chosen by `class_path` (e.g.
`lm.modules.classifier.SequenceClassifier` + `lm.data.ClassificationDataModule`), and neither of
`lm fit`'s links: the vocabulary and the context are the backbone checkpoint's (the model hands the task's
DataModule its tokenizer and context in `setup`).

    lm finetune fit  --config experiments/finetune/sst2.yaml --model.init_args.backbone pretrain.ckpt
    lm finetune test --config experiments/finetune/sst2.yaml --ckpt_path checkpoints/sst2/last.ckpt
"""

from __future__ import annotations

import lightning as L

from lm.errors import LMError
from lm.cli.lightning_cli import LMCLI, run_lightning_cli

VERBS = ("fit", "validate", "test")


class FinetuneCLI(LMCLI):
    LINK_VOCAB = False
    LINK_CONTEXT = False


def run_finetune_cli(argv: list[str]) -> FinetuneCLI:
    if not argv or argv[0] not in VERBS + ("-h", "--help"):
        raise LMError(f"usage: lm finetune {{{','.join(VERBS)}}} --config experiments/finetune/<task>.yaml ...")
    return run_lightning_cli(argv, FinetuneCLI, L.LightningModule, L.LightningDataModule, subclass_mode_data=True)
