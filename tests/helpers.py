"""What the tests share: repository paths, tiny-model and tiny-trainer flags, the `lm` command in a
subprocess, one TensorBoard reader, autograd's saved bytes (what `lm plan` is checked against), and two checks a
model variant goes through (ONNX, `lm generate`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
WIKITEXT_DIR = SHARED_DATA / "wikitext-2-raw-v1"
OFFLINE_WIKITEXT_YAML = REPO_ROOT / "experiments" / "data" / "wikitext2_offline.yaml"


def tiny_model_flags(context: int = 32, dropout: float | None = None, learning_rate: str = "3e-3",
                     warmup_steps: int = 2) -> list[str]:
    """`lm fit` flags of a 2-layer, 32-wide GPT (36k parameters with the 300-token test vocabulary)."""
    flags = ["--model.config.hidden_size", "32", "--model.config.num_hidden_layers", "2",
             "--model.config.num_attention_heads", "4", "--model.config.max_position_embeddings", str(context),
             "--model.warmup_steps", str(warmup_steps), "--model.learning_rate", learning_rate]
    if dropout is not None:
        flags += ["--model.config.dropout", str(dropout)]
    return flags


TINY_MODEL = tiny_model_flags()
TINY_TRAINER = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "12",
    "--trainer.val_check_interval", "6", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def tiny_data(files: dict[str, Path], cache_dir: Path, *, test: bool = True, batch_size: int = 8,
              samples_per_epoch: int | None = None) -> list[str]:
    """`--data.*` flags for the corpus files of `conftest.corpus_files`: vocab 300; the windows are the model's
    context (`lm fit` links data.block_size to model.config.max_position_embeddings)."""
    flags = ["--data.train_files", f"[{files['train']}]", "--data.val_files", f"[{files['valid']}]",
             "--data.vocab_size", "300", "--data.batch_size", str(batch_size),
             "--data.cache_dir", str(cache_dir)]
    if test:
        flags += ["--data.test_files", f"[{files['test']}]"]
    if samples_per_epoch is not None:
        flags += ["--data.samples_per_epoch", str(samples_per_epoch)]
    return flags


def run_lm(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`lm <args>` in a fresh Python process (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "lm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_cli_here(argv: list[str]):
    """`lm <argv>` called in this process (`lm.cli.main.main`): (exit code, stdout + stderr). For refusals, where a
    fresh process (`run_lm`) would add only its start-up: ~8 s of imports on an AVX2 CPU. A bug's traceback is
    printed into the output, as the user would see it, with the code "exception"."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from lm.cli.main import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            traceback.print_exc(file=out)
            code = "exception"
    return code, out.getvalue()


def assert_onnx_matches(model, tokenizer, folder: Path) -> None:
    """`export_onnx` of `model`, run in onnxruntime on 20 tokens of a test text: the logits are the model's (1e-4)."""
    import pytest
    import torch

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lm.export.onnx import export_onnx
    from tests.conftest import make_corpus

    export_onnx(model, tokenizer, folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.tensor([tokenizer.encode(make_corpus(1, seed=5))[:20]])
    (logits,) = session.run(["logits"], {"input_ids": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(logits) - model(x)).abs().max() < 1e-4


def assert_lm_generate_matches(ckpt: Path, cwd: Path) -> None:
    """`lm generate` of a checkpoint, greedy, in a fresh process: the completions `generate_text` gives in this one."""
    import json

    from lm.io.checkpoints import load_model
    from lm.model import generate_text

    model, tokenizer = load_model(ckpt)
    prompts = ["The river", "A small town was"]
    expected = generate_text(model, tokenizer, prompts, max_new_tokens=8, temperature=0)
    result = run_lm("generate", "--ckpt_path", str(ckpt), "--prompt", json.dumps(prompts), "--temperature", "0",
                    "--max_new_tokens", "8", "--format", "jsonl", "--threads", "1", "--dtype", "float32", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["completion"] for line in result.stdout.splitlines()] == expected


def _is_weight_cast(tensor) -> bool:
    """A copy autocast made of a parameter (its graph reaches the parameter through casts and views only)."""
    fn = tensor.grad_fn
    while fn is not None and type(fn).__name__ in ("ToCopyBackward0", "TBackward0", "ViewBackward0",
                                                    "PermuteBackward0", "TransposeBackward0"):
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def saved_bytes(model, input_ids, bf16: bool = False) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward in a forward pass (under CPU bf16 autocast with
    `bf16`), storages counted once: (activations, autocast's copies of the weights); parameters and buffers
    excluded. What `lm plan`'s activation formula is checked against."""
    import torch

    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    casts: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            (casts if _is_weight_cast(tensor) else saved)[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(input_ids)
    return sum(saved.values()), sum(casts.values())


def tb_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar under `log_dir` (all versions): tag -> {step: value}, later event files winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert event_files, f"no TensorBoard event files under {log_dir}"
    tags: dict[str, dict[int, float]] = {}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return tags


def scalar_values(log_dir: Path, tag: str) -> list[float]:
    """The values of one scalar in step order."""
    values = tb_scalars(log_dir).get(tag, {})
    return [values[step] for step in sorted(values)]


def scalar_tags(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar under `log_dir`: tag -> values in step order."""
    return {tag: [values[step] for step in sorted(values)] for tag, values in tb_scalars(log_dir).items()}
