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
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

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


def sample_scores(model, tokenizer, prompts: list[str], seeds: int, max_new_tokens: int, context_cache: bool,
                  **overrides) -> dict:
    options = SamplingOptions(max_new_tokens=max_new_tokens, context_cache=context_cache, **overrides)  # lm generate's defaults
    sampled = [text for seed in range(seeds) for text in generate_text(model, tokenizer, prompts, options, seed=seed)]
    greedy = generate_text(model, tokenizer, prompts, options, temperature=0)
    return {"sampled": _scores(sampled), "greedy": _scores(greedy), "example": sampled[0]}


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
        prompts = heading_prompts(text, args.prompts)
    except (LMError, OSError) as error:
        sys.exit(str(error))
    print(f"CPU: {describe_cpu()}\ncheckpoint: {args.checkpoint}\n{len(prompts)} prompts x {args.seeds} seeds x "
          f"{args.max_new_tokens} tokens at temperature 0.8 (top-k 50), and greedy\n")
    reference = repetition_scores(reference_pieces(text, tokenizer, args.max_new_tokens))
    default_penalty = SamplingOptions().repetition_penalty
    readings = [("plain softmax, no repetition penalty", False, 1.0),
                (f"plain softmax, penalty {default_penalty:g} (the default)", False, default_penalty)]
    if getattr(model, "accepts_context_cache", False):
        readings += [("context cache as calibrated, no penalty", True, 1.0),
                     (f"context cache as calibrated, penalty {default_penalty:g}", True, default_penalty)]
    header = f"{'distribution sampled':<52} {'rep4 T0.8':>9} {'dist2 T0.8':>10} {'rep4 greedy':>11} {'test bpb':>8}"
    print(header)
    print(f"{'the test text itself (same-length pieces)':<52} {reference['repeated_4gram_share']:9.4f} "
          f"{reference['distinct_2']:10.4f} {'':>11} {'':>8}")
    examples, default_share, bpbs = [], None, {}
    for name, cache, penalty in readings:
        start = time.perf_counter()
        with torch.inference_mode():
            scores = sample_scores(model, tokenizer, prompts, args.seeds, args.max_new_tokens, cache,
                                   repetition_penalty=penalty)
            if cache not in bpbs:  # the distribution's score; the penalty only changes sampling
                bpbs[cache] = float("nan") if args.no_bpb else evaluate_text_file(model, tokenizer, args.text_file,
                                                                                 context_cache=cache)["bpb"]
            bpb = bpbs[cache]
        sampled, greedy = scores["sampled"], scores["greedy"]
        if not cache and penalty == default_penalty:
            default_share = sampled["repeated_4gram_share"]
        print(f"{name:<52} {sampled['repeated_4gram_share']:9.4f} {sampled['distinct_2']:10.4f} "
              f"{greedy['repeated_4gram_share']:11.4f} {bpb:8.4f}   ({time.perf_counter() - start:.0f} s)")
        examples.append((name, prompts[0] + scores["example"]))
    ratio = default_share / max(reference["repeated_4gram_share"], 1e-9)  # nan (never <= BOUND) if nothing measured
    print(f"\ndefault's repeated-4-gram share / the test text's: {ratio:.2f} (bound {BOUND}: "
          f"{'met' if ratio <= BOUND else 'NOT met'})")
    for name, example in examples:
        print(f"\n--- {name}, seed 0:\n{example[:600]}")


if __name__ == "__main__":
    main()
