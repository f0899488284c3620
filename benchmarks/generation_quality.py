"""Generation quality beside the score: does the text a checkpoint samples read like its training text, or
loop? A lower bpb may not buy worse text, so both are measured on the same checkpoint.

    python benchmarks/generation_quality.py checkpoints/wikitext2_cpu/<best>.ckpt
    python benchmarks/generation_quality.py <ckpt> --prompts 16 --seeds 3 --max_new_tokens 150

Prompts: the first `--prompts` article headings of the test file (" = Robert Boulter = " and so on, with the
blank line that follows them in the raw text), so the model writes an article it never saw. Each prompt is
continued by `--max_new_tokens` tokens, at temperature 0.8 with `lm generate`'s other defaults (top-k 50),
once per seed, and greedily once.

Figures (lm.evaluation.generation_metrics.repetition_scores): the share of word 4-grams that repeat an earlier 4-gram of the
same sample (loops), and distinct-2 (unique word bigrams / bigrams per sample). The reference row is the
test text itself, cut into pieces of the same number of tokens. bpb is the test file's bits per byte under
the distribution that was sampled (`lm eval`'s scoring: non-overlapping windows of the model's context).

Rows: the plain softmax (what `lm generate`, `lm predict` and `lm serve` sample by default) and, for a model
trained with `context_cache: true`, the cache's mixture as calibrated (`--context_cache true`, the
distribution `lm eval` and `lm test` score), each without a repetition penalty and with the default one
(`SamplingOptions.repetition_penalty`). The default is the plain softmax with the penalty.

`measure(model, tokenizer, text, ...)` is the measurement without the printing and the bpb: benchmarks/quality.py
calls it for the "default" row of every run's best checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.io.checkpoints import load_model  # noqa: E402
from lm.errors import LMError  # noqa: E402
from lm.evaluation.perplexity import evaluate_text_file  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402
from lm.model import SamplingOptions, generate_text  # noqa: E402
from lm.evaluation.generation_metrics import repetition_scores  # noqa: E402

WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
BOUND = 1.5  # the default's repeated-4-gram share at temperature 0.8 may be at most 1.5x the test text's
DEFAULT_PENALTY = SamplingOptions().repetition_penalty


class Reading(NamedTuple):
    """One distribution sampled: its printed name, whether it is the context cache's mixture, the penalty."""
    name: str
    context_cache: bool
    repetition_penalty: float


READINGS = {
    "plain": Reading("plain softmax, no repetition penalty", False, 1.0),
    "default": Reading(f"plain softmax, penalty {DEFAULT_PENALTY:g} (the default)", False, DEFAULT_PENALTY),
    "cache": Reading("context cache as calibrated, no penalty", True, 1.0),
    "cache_penalty": Reading(f"context cache as calibrated, penalty {DEFAULT_PENALTY:g}", True, DEFAULT_PENALTY),
}


def heading_prompts(text: str, count: int) -> list[str]:
    """The first `count` top-level headings (" = Title = ") with the blank line after them."""
    prompts = [m.group(0) for m in re.finditer(r"^ = [^=\n].*? = \n \n", text, flags=re.MULTILINE)]
    if len(prompts) < count:
        raise LMError(f"The text has {len(prompts)} ' = Heading = ' lines, fewer than --prompts {count}.")
    return prompts[:count]


def reference_pieces(text: str, tokenizer, length: int) -> list[str]:
    """The text cut into consecutive pieces of `length` tokens, decoded: real text as long as a sample."""
    ids = tokenizer.encode(text)
    return [tokenizer.decode(ids[i:i + length]) for i in range(0, len(ids) - length + 1, length)]


def measure(model, tokenizer, text: str, prompts: int = 16, seeds: int = 3, max_new_tokens: int = 150,
            rows: Sequence[str] = ("default",), greedy: bool = True,
            on_row: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Sample `model` from the first `prompts` headings of `text` (`seeds` samples per prompt at temperature 0.8,
    lm generate's other defaults, and greedily once if `greedy`) for each of `rows` (keys of READINGS), and
    score the samples' repetition beside `text`'s own, cut into pieces as long as a sample.

    Returns {"reference": text's scores, "rows": {key: {"sampled": scores, "greedy": scores or None,
    "example": the first prompt with its seed-0 sample, "seconds": sampling time}}}, plus "rep4_ratio"
    (the default's repeated-4-gram share / the text's; nan if nothing was measured) and "within_bound"
    (ratio <= BOUND) when "default" is one of `rows`. Scores are repetition_scores' dicts
    (repeated_4gram_share, distinct_2; nan where every sample ended before 4 words). `on_row(key, result so
    far)` is called as each row is done, so a long run can show its rows as they come."""
    unknown = [key for key in rows if key not in READINGS]
    if unknown:
        raise LMError(f"Unknown rows {unknown}: choose from {list(READINGS)}.")
    if any(READINGS[key].context_cache for key in rows) and not getattr(model, "accepts_context_cache", False):
        raise LMError("The context cache rows need a model trained with `context_cache: true`.")
    if seeds < 1 or max_new_tokens < 1:
        raise LMError(f"Need at least one seed and one new token (got {seeds} seeds, {max_new_tokens} tokens).")
    prompt_texts = heading_prompts(text, prompts)
    pieces = reference_pieces(text, tokenizer, max_new_tokens)
    if not pieces:
        raise LMError(f"The text is shorter than one sample ({max_new_tokens} tokens): nothing to compare samples with.")
    result: dict = {"reference": repetition_scores(pieces), "rows": {}}
    for key in rows:
        start = time.perf_counter()
        reading = READINGS[key]
        options = SamplingOptions(max_new_tokens=max_new_tokens, context_cache=reading.context_cache,
                                  repetition_penalty=reading.repetition_penalty)  # else lm generate's defaults
        with torch.inference_mode():
            sampled = [sample for seed in range(seeds)
                       for sample in generate_text(model, tokenizer, prompt_texts, options, seed=seed)]
            greedy_texts = generate_text(model, tokenizer, prompt_texts, options, temperature=0) if greedy else None
        result["rows"][key] = {"sampled": _scores(sampled), "greedy": _scores(greedy_texts) if greedy else None,
                               "example": prompt_texts[0] + sampled[0], "seconds": time.perf_counter() - start}
        if on_row:
            on_row(key, result)
    if "default" in result["rows"]:
        ratio = result["rows"]["default"]["sampled"]["repeated_4gram_share"] / max(
            result["reference"]["repeated_4gram_share"], 1e-9)  # nan (never <= BOUND) if nothing measured
        result.update(rep4_ratio=ratio, within_bound=bool(ratio <= BOUND))
    return result


def _scores(texts: list[str]) -> dict[str, float]:
    try:
        return repetition_scores(texts)
    except LMError:  # every sample ended (end-of-text) before 4 words: nothing to measure
        return {"repeated_4gram_share": float("nan"), "distinct_2": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by lm fit")
    parser.add_argument("--text_file", default=str(WIKITEXT_TEST), help="the raw test text (prompts, reference, bpb)")
    parser.add_argument("--prompts", type=int, default=16, help="article headings to continue")
    parser.add_argument("--seeds", type=int, default=3, help="samples per prompt at temperature 0.8")
    parser.add_argument("--max_new_tokens", type=int, default=150)
    parser.add_argument("--no_bpb", action="store_true", help="skip scoring the test file (the slow part)")
    args = parser.parse_args()
    try:
        model, tokenizer = load_model(args.checkpoint)
        text = Path(args.text_file).read_text(encoding="utf-8")
        heading_prompts(text, args.prompts)  # fail before the header on too few headings
    except (LMError, OSError) as error:
        sys.exit(str(error))
    print(f"CPU: {describe_cpu()}\ncheckpoint: {args.checkpoint}\n{args.prompts} prompts x {args.seeds} seeds x "
          f"{args.max_new_tokens} tokens at temperature 0.8 (top-k 50), and greedy\n")
    print(f"{'distribution sampled':<52} {'rep4 T0.8':>9} {'dist2 T0.8':>10} {'rep4 greedy':>11} {'test bpb':>8}")
    bpbs: dict[bool, float] = {}

    def print_row(key: str, result: dict) -> None:
        if len(result["rows"]) == 1:  # the first row: the text's own figures go above it
            reference = result["reference"]
            print(f"{'the test text itself (same-length pieces)':<52} {reference['repeated_4gram_share']:9.4f} "
                  f"{reference['distinct_2']:10.4f} {'':>11} {'':>8}")
        start, reading, row = time.perf_counter(), READINGS[key], result["rows"][key]
        if reading.context_cache not in bpbs:  # the distribution's score; the penalty only changes sampling
            bpbs[reading.context_cache] = float("nan") if args.no_bpb else evaluate_text_file(
                model, tokenizer, args.text_file, context_cache=reading.context_cache)["bpb"]
        seconds = row["seconds"] + time.perf_counter() - start
        sampled, greedy = row["sampled"], row["greedy"]
        print(f"{reading.name:<52} {sampled['repeated_4gram_share']:9.4f} {sampled['distinct_2']:10.4f} "
              f"{greedy['repeated_4gram_share']:11.4f} {bpbs[reading.context_cache]:8.4f}   ({seconds:.0f} s)",
              flush=True)

    rows = [key for key in READINGS if getattr(model, "accepts_context_cache", False) or not READINGS[key].context_cache]
    try:
        result = measure(model, tokenizer, text, args.prompts, args.seeds, args.max_new_tokens, rows, on_row=print_row)
    except LMError as error:  # e.g. a text shorter than one sample: no reference to compare with
        sys.exit(str(error))
    print(f"\ndefault's repeated-4-gram share / the test text's: {result['rep4_ratio']:.2f} (bound {BOUND}: "
          f"{'met' if result['within_bound'] else 'NOT met'})")
    for key, row in result["rows"].items():
        print(f"\n--- {READINGS[key].name}, seed 0:\n{row['example'][:600]}")


if __name__ == "__main__":
    main()
