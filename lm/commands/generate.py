"""`lm generate`: complete prompts with a trained checkpoint, printed or streamed to stdout.

    lm generate --ckpt_path checkpoints/wikitext2_cpu/last.ckpt --prompt " = Valkyria Chronicles = "
    lm generate --ckpt_path ... --prompt "The river" --prompt "A town" --temperature 0 --max_new_tokens 50
    lm generate --ckpt_path ... --prompts_file prompts.txt --format jsonl > completions.jsonl
    lm generate --config my_sampling.yaml --prompt "..."

Sampling settings are one `SamplingOptions` (`--sampling.temperature 0`, or bare `--temperature 0`),
the same type, defaults and code (`generate_text` / `stream_text`) as `lm predict` and the TextSampler.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from dataclasses import fields
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import yaml

from lm.data.finetuning.templates import apply_template
from lm.errors import LMError, MissingFileError
from lm.io.checkpoints import load_model
from lm.model.generation import generate_text, stream_text
from lm.model.sampling import SamplingOptions
from lm.runtime.hardware import resolve_inference_dtype

# Sampling flags may be given bare (`--temperature 0`) as well as `--sampling.temperature 0`.
_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingOptions))
_LIST_FLAGS = ("--prompt", "--sampling.stop")


def generate(
    ckpt_path: Optional[str] = None,
    prompt: Union[str, list[str], None] = None,
    prompts_file: Optional[str] = None,
    sampling: SamplingOptions = SamplingOptions(),
    stream: Optional[bool] = None,
    batch_size: int = 8,
    format: Literal["text", "jsonl"] = "text",
    echo_prompt: bool = True,
    device: str = "cpu",
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    compile: bool = False,
    threads: Optional[int] = None,
    template: Optional[Literal["alpaca"]] = None,
) -> None:
    """Complete text prompts with a checkpoint written by `lm fit`.

    Args:
        ckpt_path: Checkpoint file, e.g. checkpoints/<experiment>/last.ckpt.
        prompt: A prompt; repeat the flag (or pass a list, `--prompt '[a, b]'`) for several.
        prompts_file: A text file with one prompt per line (empty lines are skipped).
        sampling: How to sample (`SamplingOptions`): max_new_tokens, temperature (0 = greedy), top_k,
            top_p, seed (batch i of a run uses seed + i), stop (repeat `--stop` for several), truncate.
            Each may be given bare: `--temperature 0` is `--sampling.temperature 0`.
        stream: Print each completion piece by piece as it is decoded (default: on for one prompt;
            several prompts are then decoded one after the other instead of in batches).
        batch_size: Prompts decoded together when not streaming.
        format: `text` (the prompt followed by its completion; a blank line between prompts) or
            `jsonl` (one {"prompt", "completion"} object per line).
        echo_prompt: With the text format, print the prompt before its completion.
        device: Where to run the model, e.g. cpu or cuda.
        dtype: Weights and activations type. `auto`: bfloat16 where the hardware multiplies it natively
            (AVX-512-BF16/AMX CPUs, bf16 GPUs: half the bytes to stream per decoded token) and, for one or two
            sequences decoded together, on other x86 CPUs too (a prompt's prefill is multiplied in float32 there);
            else float32 (`lm.runtime.hardware.auto_inference_dtype`). `float32` decodes exactly as the
            checkpoint's weights.
        compile: Compile the decode step (`GPT.prepare_for_inference(compile=True)`): faster steps (2.2-2.4x in
            bf16 at benchmarks/generate.py's shape) after a one-time compile of ~7 s with torch's on-disk cache
            warm (~20 s cold), so it pays for long runs only (docs/results/figures.md, "Decoding").
        threads: CPU threads for torch (default: torch's choice, one per core). On a busy machine
            1 thread can decode much faster than 2 competing for the same cores.
        template: Wrap each prompt in this instruction template before generating (`alpaca`: the
            format of experiments/finetune/alpaca.yaml, lm/data/finetuning/templates.py); the output shows the
            prompt as given.
    """
    if not ckpt_path:
        raise LMError("No checkpoint given: pass --ckpt_path, e.g. checkpoints/<experiment>/last.ckpt "
                      "(where `lm fit` writes them).")
    prompts = _collect_prompts(prompt, prompts_file)  # checked before the (slow) model load
    if batch_size <= 0:
        raise LMError(f"batch_size must be positive, got {batch_size}.")
    if stream is None:
        stream = len(prompts) == 1 and format == "text"
    dtype, chosen = resolve_inference_dtype(dtype, device, decode_rows=1 if stream else min(batch_size, len(prompts)))
    if chosen:
        print(f"lm generate: {chosen}", file=sys.stderr)
    model, tokenizer = _load(ckpt_path, device, dtype, compile, threads)
    write = _writer(sys.stdout, format, echo_prompt)
    if stream:
        for i, text in enumerate(prompts):
            write(i, text, stream_text(model, tokenizer, apply_template(template, text), sampling.for_batch(i)))
        return
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        completions = generate_text(model, tokenizer, [apply_template(template, p) for p in batch],
                                    sampling.for_batch(start // batch_size))
        for i, (text, completion) in enumerate(zip(batch, completions)):
            write(start + i, text, [completion])


def _load(ckpt_path: str, device: str, dtype: str, compile: bool, threads: Optional[int]):
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(ckpt_path, device=device, dtype=getattr(torch, dtype))
    if hasattr(model, "prepare_for_inference"):  # a GPT (a custom network may not have it)
        model.prepare_for_inference(compile=compile)
    return model, tokenizer


def _writer(out, format: str, echo_prompt: bool):
    """`write(index, prompt, completion_pieces)` in the chosen output format."""
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

    return write


def _collect_prompts(prompt: Union[str, list[str], None], prompts_file: Optional[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise MissingFileError(f"Prompts file not found: {path}.")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise LMError("No prompt given: pass --prompt TEXT (repeat it for several) or --prompts_file FILE "
                         "(one prompt per line).")
    return prompts


def prepare_args(args: list[str], own_flags: Collection[str] = ()) -> list[str]:
    """Normalize the raw arguments: bare sampling flags (`--temperature 0`) become `--sampling.<field>`,
    and repeated `--prompt X` / `--stop X` flags are collected into one list each, passed as JSON.
    `own_flags`: the verb's own parameters, kept as they are where a sampling field has the same name
    (`lm eval --context_cache` picks the distributions to score, not the sampling one).

    jsonargparse would keep only the last of repeated flags, and would read a prompt such as
    `- item` or `null` as YAML. Here each value is kept verbatim, except a value written as a list
    (`--prompt '[a, b]'`), which jsonargparse parses as before.
    """
    def canonical(flag: str) -> str:
        return f"--sampling.{flag[2:]}" if flag[2:] in _SAMPLING_FIELDS and flag[2:] not in own_flags else flag

    collected: dict[str, list[str]] = {flag: [] for flag in _LIST_FLAGS}
    rest: list[str] = []
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        flag = canonical(flag)
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
            rest.append(flag + eq + value if flag.startswith("--") else args[i])
        i += 1
    for flag, values in collected.items():
        if values:
            rest += [flag, json.dumps(values, ensure_ascii=False)]
    return rest
