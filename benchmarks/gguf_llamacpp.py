"""`lm export --format gguf` checked by llama.cpp itself: the written model.gguf loaded with llama-cpp-python,
its tokenization, logits and greedy tokens compared with lm's on the same text.

    pip install llama-cpp-python    # builds llama.cpp from source (several minutes); not needed by the tests
    python benchmarks/gguf_llamacpp.py                                  # trains tiny llama + gpt2 presets first
    python benchmarks/gguf_llamacpp.py --ckpt_path checkpoints/x/last.ckpt --types q8_0

Without --ckpt_path, a small model of each preset (--variants) is trained for --steps on --text (default:
WikiText-2's wiki.valid.raw from ../shared/data when present, else a generated text) so that its greedy
choices are well separated: a random-weight model has near-tied logits, where any rounding flips the argmax.
Then for each --types entry (and llama.cpp KV cache in f16, its default, and f32):

- tokens equal: llama.cpp's tokenizer (from the GGUF metadata) gives lm's ids on the prompts and a 2,000-
  character slice of the text (the pre-tokenizer and merges are carried over);
- max |logit diff|: over every position of prompt + llama.cpp's greedy continuation, llama.cpp's logits
  (logits_all, prompt in one batch, then one token at a time through its KV cache) against lm's forward on
  the same ids; beside it the largest |logit| for scale;
- greedy equal: how many of the --new_tokens greedy tokens are the same as `lm.model.generation.generate`'s
  (temperature 0, no repetition penalty) before the first that differs, summed over the prompts.

Prints the CPU and the versions. Figures vary with the CPU (ggml picks kernels by instruction set).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.data.tokenizer import Tokenizer  # noqa: E402
from lm.export.gguf import FILE_NAME, export_gguf, gguf_architecture  # noqa: E402
from lm.io.checkpoints import load_model  # noqa: E402
from lm.model import GPT, GPTConfig  # noqa: E402
from lm.model.generation import generate  # noqa: E402
from lm.runtime.hardware import describe_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_VALID = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
PROMPTS = [" The river flows through", " In 1999, the band released", " = Valkyria Chronicles =\n",
           " Its café — \"the best\" — opened; it's"]
PRESETS = {  # experiments/variants/*.yaml, at a size a CPU trains in a minute
    "llama": dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False,
                  num_key_value_heads=2),
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True),
}
GGML_TYPE = {"f32": 0, "f16": 1}  # ggml_type ids for llama.cpp's KV cache


def corpus(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8")
    if WIKITEXT_VALID.is_file():
        return WIKITEXT_VALID.read_text(encoding="utf-8")[:400_000]
    rng = random.Random(0)
    words = "the river town band album song war year city game series north south first later".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + " ." for _ in range(4000))


def train_tiny(variant: str, text: str, steps: int, seed: int = 0) -> tuple[GPT, Tokenizer]:
    """A small model of `variant` trained with AdamW on `text` (windows of its context), and its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer.train([text], vocab_size=512)
    ids = torch.tensor(tokenizer.encode(text))
    config = GPTConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, **PRESETS[variant])
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s:s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {variant} step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval(), tokenizer


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """(llama.cpp's greedy continuation, its logits at every position of prompt + continuation but the last)."""
    llm.reset()
    llm.eval(prompt)
    generated = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    return generated, np.array(llm.scores[: llm.n_tokens - 1], dtype=np.float32)


def compare(model: GPT, tokenizer: Tokenizer, gguf_path: Path, text: str, new_tokens: int, kv: str) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=model.config.max_position_embeddings, logits_all=True,
                n_threads=torch.get_num_threads(), type_k=GGML_TYPE[kv], type_v=GGML_TYPE[kv], verbose=False)
    samples = PROMPTS + [text[i:i + 2000] for i in (1000, 50_000) if len(text) > i + 2000]
    tokens_equal = all(llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(s)
                       for s in samples)
    max_diff = max_logit = 0.0
    same = total = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        theirs, their_logits = llama_cpp_greedy(llm, ids, new_tokens)
        ours = generate(model, [ids], max_new_tokens=new_tokens, temperature=0, top_k=None,
                        repetition_penalty=1.0)[0][len(ids):]
        with torch.no_grad():
            our_logits = model(torch.tensor([ids + theirs[:-1]]))[0].numpy()
        max_diff = max(max_diff, float(np.abs(our_logits - their_logits).max()))
        max_logit = max(max_logit, float(np.abs(our_logits).max()))
        same += next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens)  # up to the 1st difference
        total += new_tokens
    llm.close()
    return {"tokens_equal": tokens_equal, "max_diff": max_diff, "max_logit": max_logit, "same": same, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", help="an `lm fit` checkpoint of a llama or gpt2 preset (default: train tiny ones)")
    parser.add_argument("--variants", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    parser.add_argument("--kv", nargs="+", default=["f16", "f32"], choices=list(GGML_TYPE),
                        help="llama.cpp KV cache types to try (f16 is its default)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny models")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--text", help="text to train on and to tokenize (default: WikiText-2 valid if present)")
    parser.add_argument("--workdir", help="where the GGUF files go (default: a temporary folder)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp from source)")
    print(f"CPU: {describe_cpu()}; llama-cpp-python {llama_cpp.__version__}, gguf "
          f"{importlib.metadata.version('gguf')}, torch {torch.__version__}")
    text = corpus(args.text)
    if args.ckpt_path:
        models = {Path(args.ckpt_path).name: load_model(args.ckpt_path)}
    else:
        models = {variant: train_tiny(variant, text, args.steps) for variant in args.variants}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gguf_llamacpp_"))
    print("\n| model | arch | type | file MB | KV cache | tokens equal | max abs logit diff | max abs logit | greedy equal |")
    print("|---|---|---|---:|---|---|---:|---:|---:|")
    for name, (model, tokenizer) in models.items():
        model = model.float().eval()
        model = model.without_context_cache() if model.config.context_cache else model
        for gguf_type in args.types:
            folder = export_gguf(model, tokenizer, workdir / f"{name}-{gguf_type}", overwrite=True, gguf_type=gguf_type)
            size = (folder / FILE_NAME).stat().st_size / 1e6
            for kv in args.kv:
                r = compare(model, tokenizer, folder / FILE_NAME, text, args.new_tokens, kv)
                print(f"| {name} | {gguf_architecture(model.config)} | {gguf_type} | {size:.2f} | {kv} | "
                      f"{'yes' if r['tokens_equal'] else 'NO'} | {r['max_diff']:.2e} | {r['max_logit']:.1f} | "
                      f"{r['same']}/{r['total']} |", flush=True)


if __name__ == "__main__":
    main()
