"""Accuracy, macro-F1 and the confusion matrix of a classifier checkpoint on a labelled file: `lm eval --labelled_file`."""

from __future__ import annotations

from typing import Any

import torch

from lm.data.finetuning.classification_data import encode_sentences, read_labelled_file
from lm.errors import LMError
from lm.io.checkpoints import read_checkpoint
from lm.modules.classifier import SequenceClassifier, classification_metrics


@torch.no_grad()
def evaluate_labelled_file(ckpt_path: str, labelled_file: str, batch_size: int = 32,
                           encoding: str = "utf-8") -> dict[str, Any]:
    """accuracy, macro-F1 and confusion matrix of a `SequenceClassifier` checkpoint on `<label> <sentence>` lines."""
    hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
    if "num_classes" not in hparams or "config" not in hparams:
        raise LMError(f"{ckpt_path} is not a classifier checkpoint (written by `lm finetune fit` with "
                         f"SequenceClassifier): --labelled_file needs one.")
    model = SequenceClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    examples = read_labelled_file(labelled_file, encoding)
    if max(label for label, _ in examples) >= model.hparams.num_classes:
        raise LMError(f"{labelled_file} has labels beyond the classifier's {model.hparams.num_classes} classes.")
    metrics = classification_metrics(model.hparams.num_classes)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, lengths = encode_sentences(model.tokenizer, [t for _, t in chunk], model.model.config.max_position_embeddings)
        metrics.update(model(ids, lengths).argmax(-1), torch.tensor([label for label, _ in chunk]))
    values = metrics.compute()
    return {"examples": len(examples), "accuracy": float(values["acc"]), "macro_f1": float(values["f1"]),
            "confusion_matrix": values["confusion_matrix"].tolist()}
