"""`lm generate` end to end: a tiny model trained through the CLI, then `python -m lm generate` in a
subprocess: greedy output equals `generate_text` on the reloaded model, prompts from flags, a file or
a YAML config, streaming, sampling options shared with `lm predict`, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.io.checkpoints import load_model
from lm.cli.main import main
from lm.model import generate_text
from tests.conftest import write_corpus_files
from tests.helpers import TINY_MODEL, TINY_TRAINER, run_lm, tiny_data

PROMPTS = ["The river", "A small town was", " = = Section"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, checkpoint, data flags) of one tiny `lm fit` shared by this module."""
    workdir = tmp_path_factory.mktemp("generate_cli")
    data = tiny_data(write_corpus_files(workdir), workdir / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["fit", "--experiment", "tiny", *TINY_MODEL, *TINY_TRAINER, *data])
    return workdir, workdir / "checkpoints" / "tiny" / "last.ckpt", data


def generate_jsonl(workdir: Path, *args: str) -> list[dict[str, str]]:
    result = run_lm("generate", *args, "--format", "jsonl", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_greedy_output_equals_generate_text(trained):
    workdir, ckpt, _ = trained
    model, tokenizer = load_model(ckpt)
    expected = generate_text(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    assert any(expected)

    flags = [f"--prompt={p}" for p in PROMPTS]  # repeated flag; "=" form keeps the leading space of the last one
    # float32 as in Python (`--dtype auto`, the default, picks bf16 on a CPU with native bf16: its own test below)
    rows = generate_jsonl(workdir, "--ckpt_path", str(ckpt), *flags, "--temperature", "0", "--max_new_tokens", "12",
                          "--dtype", "float32")
    assert rows == [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, expected)]

    # The compiled decode step, a list-valued --prompt and a batch size that splits the prompts agree.
    rows = generate_jsonl(workdir, "--ckpt_path", str(ckpt), "--prompt", json.dumps(PROMPTS), "--temperature", "0",
                          "--max_new_tokens", "12", "--compile", "true", "--batch_size", "2", "--threads", "1",
                          "--dtype", "float32")
    assert [r["completion"] for r in rows] == expected


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_auto_dtype_follows_the_cpu(native_bf16, machine, monkeypatch):
    """`--dtype auto` (the default): bfloat16 on a CPU with native bf16; without it, on x86, for decoding one or two
    sequences together (its prefill multiplied in float32); float32 for larger batches, scoring (0 rows) and elsewhere."""
    import platform

    import lm.runtime.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    for rows in (0, 1, 2, 3, 8):
        bf16 = native_bf16 or (machine == "x86_64" and 1 <= rows <= hardware.BF16_DECODE_MAX_ROWS)
        assert hardware.auto_inference_dtype("cpu", rows)[0] == ("bfloat16" if bf16 else "float32"), rows
        assert hardware.resolve_inference_dtype("auto", "cpu", rows)[0] == hardware.auto_inference_dtype("cpu", rows)[0]
    assert hardware.resolve_inference_dtype("float32", "cpu", 1) == ("float32", "")
    assert hardware.auto_inference_dtype("mps")[0] == "float32"


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["batch", "one-prompt"])
def test_default_path_decodes_as_python_in_the_dtype_it_chose(trained, prompts):
    """The CLI's defaults on this machine: stderr says which dtype and why (for one prompt, streamed, bfloat16 on any
    x86 CPU), and the text is what Python decodes from the checkpoint loaded in that dtype."""
    import torch

    from lm.runtime.hardware import auto_inference_dtype

    workdir, ckpt, _ = trained
    dtype, why = auto_inference_dtype("cpu", decode_rows=len(prompts))  # one batch (--batch_size 8)
    model, tokenizer = load_model(ckpt, dtype=getattr(torch, dtype))
    model.prepare_for_inference()
    expected = generate_text(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    result = run_lm("generate", "--ckpt_path", str(ckpt), "--prompt", json.dumps(prompts), "--temperature", "0",
                    "--max_new_tokens", "12", "--format", "jsonl", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"lm generate: {dtype} weights ({why}" in result.stderr
    assert [json.loads(line)["completion"] for line in result.stdout.splitlines()] == expected


def test_single_prompt_streams_prompt_and_completion(trained):
    workdir, ckpt, _ = trained
    model, tokenizer = load_model(ckpt)
    expected = generate_text(model, tokenizer, ["The river"], max_new_tokens=10, temperature=0)[0]
    result = run_lm("generate", "--ckpt_path", str(ckpt), "--prompt", "The river", "--temperature", "0",
                    "--max_new_tokens", "10", "--dtype", "float32", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "The river" + expected + "\n"


def test_prompts_file_and_yaml_config(trained):
    workdir, ckpt, _ = trained
    prompts_file = workdir / "prompts.txt"
    prompts_file.write_text("The river\n\nA small town was\n", encoding="utf-8")  # the empty line is skipped
    config = workdir / "sampling.yaml"
    config.write_text(f"ckpt_path: {ckpt}\nsampling:\n  temperature: 0\n  max_new_tokens: 6\nformat: jsonl\ndtype: float32\n",
                      encoding="utf-8")
    result = run_lm("generate", "--config", str(config), "--prompts_file", str(prompts_file), cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    model, tokenizer = load_model(ckpt)
    expected = generate_text(model, tokenizer, ["The river", "A small town was"], max_new_tokens=6, temperature=0)
    assert rows == [{"prompt": "The river", "completion": expected[0]},
                    {"prompt": "A small town was", "completion": expected[1]}]


def test_seeded_sampling_and_stop_strings(trained):
    workdir, ckpt, _ = trained
    args = ["--ckpt_path", str(ckpt), "--prompt", "The river", "--temperature", "1.0", "--top_k", "20",
            "--top_p", "0.95", "--max_new_tokens", "16", "--dtype", "float32"]
    first = generate_jsonl(workdir, *args, "--seed", "7")
    assert first == generate_jsonl(workdir, *args, "--seed", "7")
    model, tokenizer = load_model(ckpt)
    expected = generate_text(model, tokenizer, ["The river"], max_new_tokens=16, temperature=1.0, top_k=20,
                             top_p=0.95, seed=7)
    assert first[0]["completion"] == expected[0]

    # Greedy text always continues with " ." somewhere in this corpus; cut before it.
    greedy = ["--ckpt_path", str(ckpt), "--prompt", "The river", "--temperature", "0", "--max_new_tokens", "16"]
    full = generate_jsonl(workdir, *greedy)[0]["completion"]
    stop = full.strip().split()[1] if len(full.split()) > 1 else full.strip()
    cut = generate_jsonl(workdir, *greedy, "--stop", stop)[0]["completion"]
    assert cut == full[:full.index(stop)]


def test_predict_uses_the_same_sampling(trained):
    """`lm predict` and `lm generate` go through SamplingOptions + generate_text: same greedy text (in the
    same precision: `lm generate --dtype float32` runs float32 weights, `precision: null` may pick bf16 autocast for predict,
    and a tiny model's greedy choices can flip on bf16 rounding)."""
    workdir, ckpt, data = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["predict", "--experiment", "pred", "--ckpt_path", str(ckpt), *TINY_TRAINER[:4], *data,
              "--trainer.precision", "32-true",
              "--trainer.precision", "32-true",  # as `lm generate` runs: null would pick bf16 on a bf16 CPU
              "--data.prompts", "[The river, A small town was]", "--model.sampling.max_new_tokens", "8",
              "--model.sampling.temperature", "0", "--model.sampling.stop", "[' =']"])
    predictions = workdir / "logs" / "pred" / "predictions.jsonl"
    predicted = [json.loads(line) for line in predictions.read_text().splitlines()]
    generated = generate_jsonl(workdir, "--ckpt_path", str(ckpt), "--prompt", "[The river, A small town was]",
                               "--temperature", "0", "--max_new_tokens", "8", "--stop", " =", "--dtype", "float32")
    assert predicted == generated


def test_help_and_clear_errors(trained, tmp_path):
    workdir, ckpt, _ = trained
    result = run_lm("generate", "--help", cwd=workdir)
    assert result.returncode == 0
    for option in ("--ckpt_path", "--prompt", "--prompts_file", "--sampling.max_new_tokens", "--sampling.temperature",
                   "--sampling.top_k", "--sampling.top_p", "--sampling.seed", "--sampling.stop", "--sampling.truncate",
                   "--stream", "--device", "--dtype", "--config"):
        assert option in result.stdout, option

    long_prompt = "The river was built in the north of England . " * 20
    cases = {
        "missing checkpoint": (["--ckpt_path", str(tmp_path / "nope.ckpt"), "--prompt", "x"],
                               [str(tmp_path / "nope.ckpt"), "checkpoints/<experiment>"]),
        "no checkpoint": (["--prompt", "x"], ["--ckpt_path"]),
        "no prompt": (["--ckpt_path", str(ckpt)], ["--prompt", "--prompts_file"]),
        "long prompt": (["--ckpt_path", str(ckpt), "--prompt", long_prompt, "--max_new_tokens", "8"],
                        ["max_position_embeddings=32", "truncate"]),
        "bad temperature": (["--ckpt_path", str(ckpt), "--prompt", "x", "--temperature", "-1"], ["temperature"]),
    }
    for name, (args, expected) in cases.items():
        result = run_lm("generate", *args, cwd=workdir)
        assert result.returncode != 0, name
        for text in expected:
            assert text in result.stderr, f"{name}: {result.stderr[-1500:]}"
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr[-1500:]}"

    # With --truncate the same prompt works (its last tokens are kept).
    rows = generate_jsonl(workdir, "--ckpt_path", str(ckpt), "--prompt", long_prompt, "--max_new_tokens", "8",
                          "--truncate", "true", "--temperature", "0")
    assert rows[0]["prompt"] == long_prompt and rows[0]["completion"]
