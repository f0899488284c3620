"""A checkpoint through `lm export --format hf` into transformers, checked the way a user would see it:
logits of a real text window and greedy continuations of a few prompts, `lm` against transformers
(`trust_remote_code=True` for lm's own code, e.g. the default recipe's model; none for GPT-2 / Llama presets).

    python benchmarks/hf_export_check.py checkpoints/wikitext2_cpu/<best>.ckpt [--output exports/check-hf]

Prints the CPU, the largest logit difference over one window of the text, and for each prompt whether the
greedy tokens are equal (repetition penalty off on both sides). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.io.checkpoints import load_model  # noqa: E402
from lm.model import generate  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402

PROMPTS = (" = Valkyria Chronicles = ", "The river", "In 1998 ,", " The game 's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_path")
    parser.add_argument("--output", help="export folder (default: a temporary one)")
    parser.add_argument("--text_file", default="../shared/data/wikitext-2-raw-v1/wiki.test.raw")
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()
    home = tempfile.mkdtemp()  # transformers copies remote code into its modules cache: keep it private
    os.environ.update(HF_HOME=home, HF_MODULES_CACHE=str(Path(home) / "modules"), HF_HUB_OFFLINE="1")
    import transformers

    output = args.output or str(Path(tempfile.mkdtemp()) / "export-hf")
    subprocess.run([sys.executable, "-m", "lm", "export", "--ckpt_path", args.ckpt_path, "--format", "hf",
                    "--output", output, "--overwrite", "true"], check=True)
    print(f"CPU: {describe_cpu()}, torch {torch.__version__}, transformers {transformers.__version__}")
    model, tokenizer = load_model(args.ckpt_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    text = Path(args.text_file).read_text(encoding="utf-8")[5000:9000] if Path(args.text_file).is_file() else \
        " ".join(PROMPTS) * 20
    ok = hf_tokenizer(text[:500])["input_ids"] == tokenizer.encode(text[:500])
    print(f"tokenizer ids equal on 500 characters: {ok}")
    ids = torch.tensor([tokenizer.encode(text)[:model.config.max_position_embeddings]])
    with torch.no_grad():
        ours = model(ids, context_cache=False) if getattr(model, "accepts_context_cache", False) else model(ids)
        diff = (hf(ids).logits - ours).abs().max().item()
    print(f"max |logit diff| over {ids.shape[1]} tokens: {diff:.2e} (largest logit {ours.abs().max().item():.1f})")
    ok &= diff < 1e-4
    for prompt in PROMPTS:
        x = torch.tensor([tokenizer.encode(prompt)])
        a = generate(model, x, max_new_tokens=args.new_tokens, temperature=0, repetition_penalty=1.0,
                     eos_id=tokenizer.eot_id)
        b = hf.generate(x, max_new_tokens=args.new_tokens, do_sample=False, repetition_penalty=1.0)
        same = a.tolist() == b.tolist()
        ok &= same
        print(f"{prompt!r}: greedy {args.new_tokens} tokens equal: {same} | "
              f"{tokenizer.decode(b[0, x.shape[1]:].tolist())[:70]!r}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
