"""`lm eval`: measure a checkpoint, printed as a table and written as JSON.

    lm eval --ckpt_path ckpt --text_files '[../shared/data/wikitext-2-raw-v1/wiki.test.raw]' --stride 64
    lm eval --ckpt_path ckpt --pairs_file qa.jsonl --template alpaca --max_new_tokens 48   # BLEU / ROUGE
    lm eval --ckpt_path classifier.ckpt --labelled_file stsa.binary.test      # accuracy / macro-F1
    lm eval --ckpt_path ckpt --harness_tasks hellaswag,arc_easy --harness_limit 200   # lm-evaluation-harness tasks

- text files: perplexity and bits-per-byte of the raw files (lm/evaluation/perplexity.py), with non-overlapping
  windows and, with `--stride`, the strided sliding window next to them; for a model with a context cache,
  the network's softmax and the cache's mixture, one row each;
- pairs: a JSONL of {"prompt", "reference"} (or Alpaca {"instruction", "input", "output"}) rows;
  answers are generated with `SamplingOptions` (greedy by default) and scored with torchmetrics' BLEU
  and ROUGE (lm/evaluation/generation_metrics.py);
- labelled file: `<label> <sentence>` lines scored by a classifier checkpoint (lm/modules/classifier.py);
- harness tasks: EleutherAI's lm-evaluation-harness run on the checkpoint (the `harness` extra;
  lm/evaluation/harness.py), its own table printed, its results in the JSON under "harness".
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from lm.errors import LMError
from lm.commands.generate import prepare_args as prepare_generation_args
from lm.evaluation.perplexity import evaluate_text_file_both, summarize
from lm.extras import install_hint
from lm.io.checkpoints import load_model
from lm.runtime.hardware import resolve_inference_dtype
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
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    harness_tasks: Optional[str] = None,
    harness_include_path: Optional[str] = None,
    harness_limit: Optional[int] = None,
    harness_batch_size: Optional[int] = None,
    harness_output: Optional[str] = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint written by `lm fit` on text files, prompt/reference pairs, labelled sentences or
    lm-evaluation-harness tasks.

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
        dtype: Weights and activations of the scored model. `auto`: bfloat16 on a CPU that multiplies it in
            hardware (AVX-512-BF16 / AMX: the precision `lm fit` trains in there, about 1.6x faster to score,
            within ~1e-4 of the float32 bits-per-byte), else float32. The log-softmax is float32 either way.
            `float32` for the reference figure; each row says which was used.
        harness_tasks: EleutherAI lm-evaluation-harness tasks, comma-separated (`hellaswag,arc_easy`; the
            `harness` extra). The network's softmax is scored unless --context_cache true.
        harness_include_path: A folder of your own harness task YAMLs (the harness's --include_path).
        harness_limit: At most this many examples per harness task (default: all).
        harness_batch_size: Harness requests per forward pass (default: --batch_size).
        harness_output: Write the harness's whole results (configs, versions, metrics) as JSON here.
    """
    if not ckpt_path:
        raise LMError("No checkpoint given: pass --ckpt_path, e.g. checkpoints/<experiment>/last.ckpt.")
    harness_options = {"--harness_include_path": harness_include_path, "--harness_limit": harness_limit,
                       "--harness_batch_size": harness_batch_size, "--harness_output": harness_output}
    if not harness_tasks and any(value is not None for value in harness_options.values()):
        given = ", ".join(k for k, v in harness_options.items() if v is not None)
        raise LMError(f"{given}: harness options, given without the tasks to run: add --harness_tasks TASK[,TASK] "
                      f"(e.g. --harness_tasks hellaswag).")
    if not (text_files or pairs_file or labelled_file or harness_tasks):
        raise LMError("Nothing to evaluate: pass --text_files, --pairs_file, --labelled_file or --harness_tasks.")
    if harness_tasks:
        _require_harness()  # before the checkpoint is read
    if threads is not None:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    # The labelled-file and pairs scorers are imported when asked for: they bring Lightning and torchmetrics' text
    # metrics (~5 s of start-up at 2 threads) that scoring a text file, the common case, does not use.
    if labelled_file:
        from lm.evaluation.labelled_file import evaluate_labelled_file

        results["classification"] = evaluate_labelled_file(ckpt_path, labelled_file, batch_size=batch_size)
        _print_classification(results["classification"])
    if text_files or pairs_file or harness_tasks:
        scoring_dtype = _scoring_dtype(dtype)
        model, tokenizer = _load_for_scoring(ckpt_path, scoring_dtype)
        _say_folded_temperature(model, results)
        if text_files:
            results["text"] = [{**row, "dtype": scoring_dtype} for row in _evaluate_texts(
                model, tokenizer, text_files, context, stride, batch_size, context_cache)]
        if pairs_file:
            from lm.evaluation.generation_metrics import evaluate_pairs_file

            results["generation"] = evaluate_pairs_file(model, tokenizer, pairs_file, sampling, template, batch_size)
            print(_table(["metric", "value"], [[k, _fmt(v)] for k, v in results["generation"]["scores"].items()]))
        if harness_tasks:
            results["harness"] = _evaluate_harness(model, tokenizer, harness_tasks, harness_include_path, harness_limit,
                                                   harness_batch_size or batch_size, context_cache, harness_output)
    if output:
        _write_json(Path(output), results)
    return results


def _load_for_scoring(ckpt_path: str, dtype: str):
    """(model, tokenizer) of the checkpoint in `dtype`, a GPT prepared for inference (lm/model/inference.py: on x86,
    float32 products of many rows by weights packed for oneDNN)."""
    model, tokenizer = load_model(ckpt_path, dtype=getattr(torch, dtype))
    if hasattr(model, "prepare_for_inference"):  # a custom network may not have it
        model.prepare_for_inference()
    return model, tokenizer


def _say_folded_temperature(model, results: dict[str, Any]) -> None:
    """What "the network's softmax" is in a checkpoint trained with model.calibrate_temperature."""
    if model.folded_temperature is not None:
        results["network_temperature"] = model.folded_temperature
        print(f"The network's softmax is calibrated: temperature {model.folded_temperature:g}, chosen on the "
              f"validation text and folded into the weights by training (model.calibrate_temperature).")


def _evaluate_texts(model, tokenizer, text_files, context, stride, batch_size, context_cache) -> list[dict[str, Any]]:
    if stride is not None and stride <= 0:  # 0 used to be read as "no stride", silently
        raise LMError(f"--stride must be a positive number of tokens (or left out), got {stride}.")
    files = [text_files] if isinstance(text_files, str) else list(text_files)
    methods = [("non-overlapping", None)] + ([(f"stride {stride}", stride)] if stride else [])
    distributions = tuple(_distributions(model, context_cache))
    # Both distributions of a file come from one pass of the network (evaluate_text_file_both); rows are
    # listed network first, then the cache, as before.
    scored = {(path, method_stride): evaluate_text_file_both(model, tokenizer, path, context, method_stride,
                                                             batch_size, distributions)
              for _, method_stride in methods for path in files}
    rows = []
    for cache in distributions:
        for method, method_stride in methods:
            method = f"{method}, context cache" if cache else method
            sums = [0.0, 0, 0]
            for path in files:
                scores = scored[(path, method_stride)][cache]
                rows.append({"file": str(path), "method": method, "context_cache": cache, **scores})
                sums = [sums[0] + scores["nll"], sums[1] + scores["tokens"], sums[2] + scores["bytes"]]
            if len(files) > 1:
                rows.append({"file": "all (token-weighted)", "method": method, "context_cache": cache, **summarize(*sums)})
    header = ["file", "method", "tokens", "bytes", "loss", "ppl", "bpb"]
    print(_table(header, [[_fmt(r[h]) for h in header] for r in rows]))
    return rows


def _require_harness() -> None:
    """The harness extra, or one line saying how to install it (it is not in `all`, so not in lm.extras.EXTRAS)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise LMError(f"lm eval --harness_tasks needs the harness extra (lm_eval is not installed): "
                      f"{install_hint('harness')}.") from error


def _evaluate_harness(model, tokenizer, tasks: str, include_path: Optional[str], limit: Optional[int], batch_size: int,
                      context_cache: Optional[bool], output: Optional[str]) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks; print its table; return each task's metrics (its `results` section).
    The network's softmax unless `--context_cache true` (one distribution: the harness reports one row a task)."""
    from lm.evaluation.harness import evaluate_harness, results_table  # imports lm_eval: the harness extra

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    results = evaluate_harness(model, tokenizer, names, include_path, limit, batch_size, bool(context_cache))
    print(results_table(results))
    if output:
        # The harness's configs hold values JSON has no type for (functions of task YAMLs): written as text.
        atomic_write_text(Path(output), json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                                                   ensure_ascii=False, default=str) + "\n")
    return results["results"]


def _scoring_dtype(dtype: str) -> str:
    dtype, chosen = resolve_inference_dtype(dtype, "cpu", decode_rows=0)  # lm eval scores, on the CPU
    if chosen and dtype == "bfloat16":  # float32 is the reference figure: say only when it is not that
        print(f"Scoring with {chosen}.")
    return dtype


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


def prepare_args(args: list[str]) -> list[str]:
    """`lm generate`'s normalization (bare sampling flags, repeated --prompt), except that eval's own
    parameters keep their names: `--context_cache` chooses the rows, it is not the sampling field."""
    return prepare_generation_args(args, own_flags=set(inspect.signature(evaluate).parameters))
