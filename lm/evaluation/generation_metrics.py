"""Generation metrics for `lm eval --pairs_file`: BLEU and ROUGE of generated answers (torchmetrics.text).

- `text_scores(predictions, references)`: corpus BLEU-4 (torchmetrics `BLEUScore`, whitespace
  tokens, no smoothing) and ROUGE-1/2/L F-measures (`ROUGEScore`, averaged over examples), in [0, 1];
- `read_pairs(path)`: a JSONL of {"prompt", "reference"} rows, or Alpaca {"instruction", "input",
  "output"} rows (a .json list or .jsonl), so a held-out Alpaca split is scored as it is;
- `evaluate_pairs_file(...)`: generate an answer per prompt (`generate_text`, `SamplingOptions`,
  optional template) and score it;
- `repetition_scores(texts)`: how much samples repeat themselves — the share of word 4-grams that already
  occurred earlier in the same text, and distinct-2 (unique word bigrams / bigrams, per text). Compared with
  the same figures of real text cut to the same length, they say whether a model degenerates into loops
  (benchmarks/generation_quality.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from torchmetrics.text import BLEUScore, ROUGEScore

from lm.data.finetuning.templates import apply_template
from lm.errors import LMError, MissingFileError
from lm.model.generation import generate_text
from lm.model.sampling import SamplingOptions

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    if len(predictions) != len(references) or not predictions:
        raise LMError(f"Need as many predictions as references (got {len(predictions)} and {len(references)}).")
    scores = {"bleu": float(BLEUScore(n_gram=4)(predictions, [[r] for r in references]))}
    rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)(predictions, references)
    scores.update({key: float(rouge[f"{key}_fmeasure"]) for key in ROUGE_KEYS})
    return scores


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """Rows with "prompt", "input" and "reference" from a JSONL / JSON list of prompt-reference or Alpaca rows."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Pairs file not found: {path}.")
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    pairs = []
    for number, row in enumerate(rows, 1):
        if "prompt" in row and "reference" in row:
            pairs.append({"prompt": row["prompt"], "input": "", "reference": row["reference"]})
        elif "instruction" in row and "output" in row:
            pairs.append({"prompt": row["instruction"], "input": row.get("input") or "", "reference": row["output"]})
        else:
            raise LMError(f"{path} row {number}: expected keys prompt/reference or instruction/input/output, "
                             f"got {sorted(row)}.")
    return pairs


def evaluate_pairs_file(model, tokenizer, path: str | Path, options: SamplingOptions, template: Optional[str] = None,
                        batch_size: int = 8) -> dict[str, Any]:
    """Generate an answer for every prompt of `path` and score it against its reference."""
    pairs = read_pairs(path)
    prompts = [apply_template(template, p["prompt"], p["input"]) if template else p["prompt"] for p in pairs]
    options = replace(options, truncate=True)  # a prompt too long for the context keeps its end
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += generate_text(model, tokenizer, prompts[start:start + batch_size],
                                 options.for_batch(start // batch_size))
    answers = [a.strip() for a in answers]
    return {"examples": len(pairs), "scores": text_scores(answers, [p["reference"] for p in pairs]),
            "samples": [{"prompt": p["prompt"], "reference": p["reference"], "answer": a}
                        for p, a in list(zip(pairs, answers))[:5]]}


def repetition_scores(texts: list[str], n: int = 4) -> dict[str, float]:
    """`repeated_{n}gram_share`: over all texts, the share of word n-grams (whitespace words) that repeat an
    n-gram seen earlier in the same text (0 = none, pooled over texts); `distinct_2`: the mean over texts of
    unique word bigrams / word bigrams (1 = no bigram twice). Texts shorter than n words count no n-grams."""
    repeated = total = 0
    distinct = []
    for text in texts:
        words = text.split()
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
        bigrams = list(zip(words, words[1:]))
        if bigrams:
            distinct.append(len(set(bigrams)) / len(bigrams))
    if total == 0:
        raise LMError(f"No text of at least {n} words to measure repetition on.")
    return {f"repeated_{n}gram_share": repeated / total, "distinct_2": sum(distinct) / len(distinct)}
