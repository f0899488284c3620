"""What the context cache adds: one checkpoint trained with `context_cache: true`, scored on a raw text
file with its calibration switched piece by piece (lm/model/context_cache.py).

    python benchmarks/context_cache_ablation.py checkpoints/<run>/<best>.ckpt
    python benchmarks/context_cache_ablation.py <ckpt> --text_file ../shared/data/wikitext-2-raw-v1/wiki.test.raw

Rows: the plain softmax (weight 0, temperature 1: the transformer alone), the calibrated temperature
alone, the calibrated copy distribution alone (temperature 1), and both (the checkpoint as saved, what
`lm eval` scores). The scoring is `lm eval`'s: the file as given, non-overlapping windows of the model's
context, bits per byte over the file's UTF-8 bytes. Training is the same for every row: the cache only
changes how the trained model's output is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.io.checkpoints import load_model  # noqa: E402
from lm.errors import LMError  # noqa: E402
from lm.evaluation.perplexity import evaluate_text_file  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402

WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of a run with model.config.context_cache: true")
    parser.add_argument("--text_file", default=str(WIKITEXT_TEST), help="raw UTF-8 text to score")
    args = parser.parse_args()
    try:
        model, tokenizer = load_model(args.checkpoint)
    except LMError as error:  # a missing or foreign file: say so, without a traceback
        sys.exit(str(error))
    if not getattr(model, "accepts_context_cache", False):
        sys.exit(f"{args.checkpoint} has no context cache (its config has context_cache: false): nothing to ablate.")
    cache = model.context_cache
    sharpness, weight, temperature = float(cache.sharpness), float(cache.weight), float(cache.temperature)
    print(f"CPU: {describe_cpu()}\ncheckpoint: {args.checkpoint}\ncalibrated on validation: sharpness {sharpness:g}, "
          f"weight {weight:g}, temperature {temperature:g}\n")
    rows = [("plain softmax (the transformer alone)", 0.0, 1.0), ("temperature only", 0.0, temperature),
            ("copy distribution only", weight, 1.0), ("both (as saved; lm eval's cache row)", weight, temperature)]
    print(f"{'reading':<40} {'loss':>7} {'ppl':>8} {'bpb':>7}")
    for name, w, t in rows:
        cache.weight.fill_(w)
        cache.temperature.fill_(t)
        try:
            with torch.inference_mode():
                scores = evaluate_text_file(model, tokenizer, args.text_file, context_cache=True)
        except LMError as error:  # e.g. the text file is missing or not UTF-8
            sys.exit(str(error))
        print(f"{name:<40} {scores['loss']:7.4f} {scores['ppl']:8.2f} {scores['bpb']:7.4f}")


if __name__ == "__main__":
    main()
