"""`lm eval`: measure a checkpoint, printed as a table and written as JSON.

    lm eval --ckpt_path ckpt --text_files '[../shared/data/wikitext-2-raw-v1/wiki.test.raw]' --stride 64
    lm eval --ckpt_path ckpt --pairs_file qa.jsonl --template alpaca --max_new_tokens 48   # BLEU / ROUGE
    lm eval --ckpt_path classifier.ckpt --labelled_file stsa.binary.test      # accuracy / macro-F1

- text files: perplexity and bits-per-byte of the raw files (lm/evaluation/perplexity.py), with non-overlapping
  windows and, with `--stride`, the strided sliding window next to them; for a model with a context cache,
  the network's softmax and the cache's mixture, one row each;
- pairs: a JSONL of {"prompt", "reference"} (or Alpaca {"instruction", "input", "output"}) rows;
  answers are generated with `SamplingOptions` (greedy by default) and scored with torchmetrics' BLEU
  and ROUGE (lm/evaluation/generation_metrics.py);
- labelled file: `<label> <sentence>` lines scored by a classifier checkpoint (lm/modules/classifier.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lm.errors import LMError
from lm.evaluation.generation_metrics import evaluate_pairs_file
from lm.evaluation.labelled_file import evaluate_labelled_file
from lm.evaluation.perplexity import evaluate_text_file, summarize
from lm.io.checkpoints import load_model
from lm.io.files import atomic_write_text
from lm.model.sampling import SamplingOptions


def evaluate(
    ckpt_path: Optional[str] = None,
    text_files: Union[str, list[str], None] = None,
    stride: Optional[int] = None,
    context: Optional[int] = None,
    context_cache: Optional[bool] = None,
    pairs_file: Optional[str] = None,
    template: Optional[str] = None,
    sampling: SamplingOptions = SamplingOptions(temperature=0.0, repetition_penalty=1.0),
    labelled_file: Optional[str] = None,
    batch_size: int = 8,
    output: Optional[str] = None,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint written by `lm fit` on text files, prompt/reference pairs or labelled sentences.

    Args:
        ckpt_path: Checkpoint file (a language model, or a classifier for --labelled_file).
        text_files: Raw UTF-8 text files to score (perplexity, bits per byte of every byte of the file).
        stride: Also score with the strided sliding window: windows of `context` tokens every `stride`
            tokens, each token scored once with the most context (stride = context: non-overlapping).
        context: Window length in tokens (default: the model's context).
        context_cache: For a model trained with a context cache (the default recipe): score the network's
            softmax and the cache's mixture (default: both, one row each), only the mixture (true) or only
            the network (false).
        pairs_file: JSONL of {"prompt", "reference"} or Alpaca {"instruction", "input", "output"} rows:
            generate an answer per prompt and report BLEU and ROUGE against the references.
        template: Prompt template for the pairs (`alpaca`, see lm/data/finetuning/templates.py); default: the raw prompt.
        sampling: How answers are generated (`SamplingOptions`; greedy by default). Fields may be
            given bare: `--max_new_tokens 48` is `--sampling.max_new_tokens 48`.
        labelled_file: `<label> <sentence>` lines: accuracy, macro-F1 and confusion matrix of a classifier.
        batch_size: Windows / prompts / sentences per forward pass.
        output: Write the results as JSON here (default: only print them).
        threads: CPU threads for torch (default: torch's choice).
    """
    if not ckpt_path:
        raise LMError("No checkpoint given: pass --ckpt_path, e.g. checkpoints/<experiment>/last.ckpt.")
    if not (text_files or pairs_file or labelled_file):
        raise LMError("Nothing to evaluate: pass --text_files, --pairs_file or --labelled_file.")
    if threads is not None:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    if labelled_file:
        results["classification"] = evaluate_labelled_file(ckpt_path, labelled_file, batch_size=batch_size)
        _print_classification(results["classification"])
    if text_files or pairs_file:
        model, tokenizer = load_model(ckpt_path)
        if text_files:
            results["text"] = _evaluate_texts(model, tokenizer, text_files, context, stride, batch_size, context_cache)
        if pairs_file:
            results["generation"] = evaluate_pairs_file(model, tokenizer, pairs_file, sampling, template, batch_size)
            print(_table(["metric", "value"], [[k, _fmt(v)] for k, v in results["generation"]["scores"].items()]))
    if output:
        _write_json(Path(output), results)
    return results


def _evaluate_texts(model, tokenizer, text_files, context, stride, batch_size, context_cache) -> list[dict[str, Any]]:
    if stride is not None and stride <= 0:  # 0 used to be read as "no stride", silently
        raise LMError(f"--stride must be a positive number of tokens (or left out), got {stride}.")
    files = [text_files] if isinstance(text_files, str) else list(text_files)
    methods = [("non-overlapping", None)] + ([(f"stride {stride}", stride)] if stride else [])
    rows = []
    for cache in _distributions(model, context_cache):
        for method, method_stride in methods:
            method = f"{method}, context cache" if cache else method
            sums = [0.0, 0, 0]
            for path in files:
                scores = evaluate_text_file(model, tokenizer, path, context, method_stride, batch_size, cache)
                rows.append({"file": str(path), "method": method, "context_cache": cache, **scores})
                sums = [sums[0] + scores["nll"], sums[1] + scores["tokens"], sums[2] + scores["bytes"]]
            if len(files) > 1:
                rows.append({"file": "all (token-weighted)", "method": method, "context_cache": cache, **summarize(*sums)})
    header = ["file", "method", "tokens", "bytes", "loss", "ppl", "bpb"]
    print(_table(header, [[_fmt(r[h]) for h in header] for r in rows]))
    return rows


def _distributions(model, context_cache: Optional[bool]) -> list[bool]:
    """Which distributions to score: the network's softmax, and the context cache's mixture for a model that
    has one (both unless `--context_cache` picks one)."""
    has_cache = getattr(model, "accepts_context_cache", False)
    if context_cache and not has_cache:
        raise LMError("--context_cache true: this checkpoint has no context cache (its config has context_cache: false).")
    if context_cache is None:
        return [False, True] if has_cache else [False]
    return [context_cache]


def _print_classification(scores: dict[str, Any]) -> None:
    print(_table(["metric", "value"], [[k, _fmt(v)] for k, v in scores.items() if k != "confusion_matrix"]))
    print("confusion matrix (rows: true label, columns: predicted):")
    for row in scores["confusion_matrix"]:
        print("  " + " ".join(f"{v:6d}" for v in row))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
