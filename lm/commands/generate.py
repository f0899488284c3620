"""`lm generate`: complete prompts with a trained checkpoint, printed or streamed to stdout.

    lm generate --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --prompt " = Valkyria Chronicles = "
    lm generate --ckpt_path ... --prompt "The river" --prompt "A town" --temperature 0 --max_new_tokens 50
    lm generate --ckpt_path ... --prompts_file prompts.txt --format jsonl > completions.jsonl
    lm generate --config my_sampling.yaml --prompt "..."

Sampling goes through `SamplingOptions` and `generate_text` / `stream_text`, the same code (and the
same defaults) as `lm predict`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional, Union

from lm.model.generate import SamplingOptions

_DEFAULTS = SamplingOptions()
_LIST_FLAGS = ("--prompt", "--stop")


def generate(
    ckpt_path: Optional[str] = None,
    prompt: Union[str, list[str], None] = None,
    prompts_file: Optional[str] = None,
    max_new_tokens: int = _DEFAULTS.max_new_tokens,
    temperature: float = _DEFAULTS.temperature,
    top_k: Optional[int] = _DEFAULTS.top_k,
    top_p: Optional[float] = _DEFAULTS.top_p,
    seed: Optional[int] = _DEFAULTS.seed,
    stop: Union[str, list[str], None] = None,
    truncate: bool = _DEFAULTS.truncate,
    stream: Optional[bool] = None,
    batch_size: int = 8,
    format: Literal["text", "jsonl"] = "text",
    echo_prompt: bool = True,
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16"] = "float32",
    compile: bool = False,
    threads: Optional[int] = None,
) -> None:
    """Complete text prompts with a checkpoint written by `lm fit`.

    Args:
        ckpt_path: Checkpoint file, e.g. checkpoints/<experiment>/last.ckpt.
        prompt: A prompt; repeat the flag (or pass a list, `--prompt '[a, b]'`) for several.
        prompts_file: A text file with one prompt per line (empty lines are skipped).
        max_new_tokens: Most tokens to generate per prompt.
        temperature: 0 is greedy decoding; otherwise the softmax temperature.
        top_k: Sample only among the k most likely tokens (null: no limit).
        top_p: Nucleus sampling threshold in (0, 1] (null: off).
        seed: Seed for reproducible sampling (batch i of a run uses seed + i); null: a fresh draw.
        stop: A string that ends a completion (it is not printed); repeat the flag for several.
            Escapes work inside a YAML list: `--stop '["\\n\\n"]'`.
        truncate: Keep only the last tokens of a prompt that does not fit in the context together
            with max_new_tokens (default: that is an error).
        stream: Print each completion piece by piece as it is decoded (default: on for one prompt;
            several prompts are then decoded one after the other instead of in batches).
        batch_size: Prompts decoded together when not streaming.
        format: `text` (the prompt followed by its completion; a blank line between prompts) or
            `jsonl` (one {"prompt", "completion"} object per line).
        echo_prompt: With the text format, print the prompt before its completion.
        device: Where to run the model, e.g. cpu or cuda.
        dtype: Weights and activations type: float32 or bfloat16 (half the bytes to stream per
            token: the faster decode with `compile`, even on CPUs without native bf16).
        compile: Compile the decode step (`GPT.prepare_for_inference(compile=True)`): 1.5-2x
            faster decoding on a 2-core CPU after a one-time compile of ~2-22 s; same results.
        threads: CPU threads for torch (default: torch's choice, one per core). On a busy machine
            1 thread can decode much faster than 2 competing for the same cores.
    """
    if not ckpt_path:
        raise ValueError("No checkpoint given: pass --ckpt_path, e.g. checkpoints/<experiment>/last.ckpt "
                         "(where `lm fit` writes them).")
    prompts = _collect_prompts(prompt, prompts_file)
    # Checked before the (slow) model load so a typo fails at once.
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=stop, truncate=truncate)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if stream is None:
        stream = len(prompts) == 1 and format == "text"

    import torch

    from lm.checkpoint import load_model
    from lm.model.generate import generate_text, stream_text

    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(ckpt_path, device=device, dtype=getattr(torch, dtype))
    if hasattr(model, "prepare_for_inference"):  # a GPT (a custom network may not have it)
        model.prepare_for_inference(compile=compile)
    out = sys.stdout

    def write(index: int, text: str, completion_pieces) -> None:
        if format == "jsonl":
            completion = "".join(completion_pieces)
            out.write(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False) + "\n")
            out.flush()
            return
        if index > 0:
            out.write("\n")
        if echo_prompt:
            out.write(text)
        for piece in completion_pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()

    if stream:
        for i, text in enumerate(prompts):
            write(i, text, stream_text(model, tokenizer, text, **options.kwargs(seed_offset=i)))
        return
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        completions = generate_text(model, tokenizer, batch, **options.kwargs(seed_offset=start // batch_size))
        for i, (text, completion) in enumerate(zip(batch, completions)):
            write(start + i, text, [completion])


def _collect_prompts(prompt: Union[str, list[str], None], prompts_file: Optional[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"Prompts file not found: {path}.")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No prompt given: pass --prompt TEXT (repeat it for several) or --prompts_file FILE "
                         "(one prompt per line).")
    return prompts


def prepare_args(args: list[str]) -> list[str]:
    """Collect repeated `--prompt X` / `--stop X` flags into one list each, passed as JSON.

    jsonargparse would keep only the last of repeated flags, and would read a prompt such as
    `- item` or `null` as YAML. Here each value is kept verbatim, except a value written as a list
    (`--prompt '[a, b]'`), which jsonargparse parses as before.
    """
    import yaml

    collected: dict[str, list[str]] = {flag: [] for flag in _LIST_FLAGS}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in collected and (eq or i + 1 < len(args)):
            if not eq:
                value = args[i + 1]
                i += 1
            parsed = None
            if value.lstrip().startswith("["):
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    parsed = None
            collected[flag] += [str(v) for v in parsed] if isinstance(parsed, list) else [value]
        else:
            rest.append(arg)
        i += 1
    for flag, values in collected.items():
        if values:
            rest += [flag, json.dumps(values, ensure_ascii=False)]
    return rest
