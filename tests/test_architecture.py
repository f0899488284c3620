"""The framework's seams: metrics that don't follow the objective, a researcher's subclass living outside
the package, precision picked for the machine, and the code-shape rules of the package itself."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lm.data import TextDataModule
from lm.modules import LanguageModel
from tests.helpers import REPO_ROOT, TINY_TRAINER, run_lm, scalar_tags, tiny_data, tiny_model_flags

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)


class ShiftedObjective(LanguageModel):
    """Trains on the cross-entropy plus a large constant: a different objective, the same model."""

    def compute_loss(self, logits, targets):
        return super().compute_loss(logits, targets) + 100.0


def evaluate(model: LanguageModel, datamodule: TextDataModule, tmp_path: Path) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    metrics = {**trainer.validate(model, datamodule=datamodule, verbose=False)[0],
               **trainer.test(model, datamodule=datamodule, verbose=False)[0]}
    return {k: float(v) for k, v in metrics.items()}


def test_metrics_are_plain_nll_whatever_the_objective(tmp_path, corpus_files):
    from lm.model import GPTConfig

    def make_datamodule() -> TextDataModule:
        return TextDataModule(train_files=str(corpus_files["train"]), val_files=str(corpus_files["valid"]),
                              test_files=str(corpus_files["test"]), vocab_size=300, block_size=16, batch_size=8,
                              cache_dir=str(tmp_path / "cache"))

    datamodule = make_datamodule()
    torch.manual_seed(0)
    base = LanguageModel(GPTConfig(**TINY))
    shifted = ShiftedObjective(GPTConfig(**TINY))
    shifted.load_state_dict(base.state_dict())
    base_metrics, shifted_metrics = evaluate(base, datamodule, tmp_path), evaluate(shifted, datamodule, tmp_path)
    for name in ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb"):
        assert shifted_metrics[name] == pytest.approx(base_metrics[name], rel=1e-6), name
    assert base_metrics["val/ppl"] == pytest.approx(math.exp(base_metrics["val/loss"]), rel=1e-5)
    # ...while training does minimize the subclass's objective.
    datamodule = make_datamodule()  # a fresh one, as a training script would have (same cache)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    logits = shifted(batch[0])
    assert float(shifted.compute_loss(logits, batch[1])) == pytest.approx(float(base.compute_loss(logits, batch[1])) + 100)


RESEARCH_MODULE = '''
"""A researcher's variant, outside the lm package: a gated residual block and a z-loss objective."""
import torch
from torch import nn

from lm.model import GPT
from lm.model.layers import Block
from lm.modules import LanguageModel


class GatedBlock(Block):
    """The stock block with a learned scalar gate on each residual branch."""

    def __init__(self, config, layer_idx=0, attention_class=None, **kwargs):
        super().__init__(config, layer_idx, **({"attention_class": attention_class} if attention_class else {}))
        self.branch_gate = nn.Parameter(torch.ones(2))

    def forward(self, x, rotary=None, kv_cache=None, attention_mask=None):
        x = x + self.branch_gate[0] * self.attn(self.attn_norm(x), rotary, kv_cache, attention_mask)
        return x + self.branch_gate[1] * self.mlp(self.mlp_norm(x))


class ZLossModel(LanguageModel):
    def __init__(self, *args, z_loss: float = 1e-2, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss

    def build_model(self, config):
        return GPT(config, block_class=GatedBlock)

    def compute_loss(self, logits, targets):
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return super().compute_loss(logits, targets) + self.z_loss * z
'''


@pytest.mark.slow
def test_a_subclass_outside_the_package_trains_validates_reloads_and_generates(tmp_path, corpus_files, monkeypatch):
    """The README's extension path, as a user takes it: their module on PYTHONPATH, `lm` unchanged."""
    package = tmp_path / "research"
    package.mkdir()
    (package / "my_variant.py").write_text(textwrap.dedent(RESEARCH_MODULE))
    monkeypatch.setenv("PYTHONPATH", f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    data = tiny_data(corpus_files, tmp_path / "cache")
    fit = run_lm("fit", "--experiment", "zl", "--model", "my_variant.ZLossModel", "--model.z_loss", "0.5",
                 *tiny_model_flags(), *TINY_TRAINER, *data, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "zl" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["_class_path"] == "my_variant.ZLossModel"
    assert saved["hyper_parameters"]["z_loss"] == 0.5
    assert any(k.endswith("branch_gate") for k in saved["state_dict"])
    # Validation reports true perplexity: exp of the plain NLL, not of the z-loss objective.
    tags = scalar_tags(tmp_path / "logs" / "zl")
    assert tags["val/ppl"][-1] == pytest.approx(math.exp(tags["val/loss"][-1]), rel=1e-4)
    train_loss, val_loss = tags["train/loss"][-1], tags["val/loss"][-1]
    assert train_loss > val_loss + 0.5, "the objective (with z-loss) is not what validation reports"
    # Reloaded from its checkpoint alone, it validates to the same figure...
    again = run_lm("validate", "--experiment", "zl_again", "--ckpt_path", str(ckpt), *TINY_TRAINER[:4], *data,
                   cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert scalar_tags(tmp_path / "logs" / "zl_again")["val/loss"][-1] == pytest.approx(val_loss, abs=1e-5)
    # ...and generates.
    out = run_lm("generate", "--ckpt_path", str(ckpt), "--prompt", "The river", "--temperature", "0",
                 "--max_new_tokens", "6", "--format", "jsonl", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[0])["completion"]


# ------------------------------------------------------------------------------------- precision
def test_auto_precision_follows_the_hardware(monkeypatch):
    import lm.runtime.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.auto_precision("cpu")[0] == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    precision, reason = hardware.auto_precision("cpu")
    assert precision == "32-true" and "no native bf16" in reason


def test_cli_picks_precision_visibly_and_an_explicit_value_wins(tmp_path, corpus_files, monkeypatch):
    from lm.runtime.hardware import auto_precision
    from lm.cli.lightning_cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--experiment", "p", *tiny_model_flags(), *TINY_TRAINER, "--trainer.max_steps", "1",
            *tiny_data(corpus_files, tmp_path / "cache")]
    expected, _ = auto_precision("cpu")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    lm_logger = logging.getLogger("lm")
    level = lm_logger.level
    lm_logger.addHandler(handler)
    lm_logger.setLevel(logging.INFO)
    try:
        cli = run_lightning_cli([*args, "--trainer.precision", "null"])
    finally:
        lm_logger.removeHandler(handler)
        lm_logger.setLevel(level)
    assert cli.trainer.precision == expected
    assert [r.getMessage() for r in records if r.getMessage().startswith(f"precision {expected} ")]
    other = "bf16-mixed" if expected == "32-true" else "32-true"
    cli = run_lightning_cli([*args, "--experiment", "p2", "--trainer.precision", other])
    assert cli.trainer.precision == other


# ---------------------------------------------------------------------------------- code shape
PACKAGE = REPO_ROOT / "lm"


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _code_lines(node) -> int:
    """Lines of a function without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [f"{p.relative_to(REPO_ROOT)}:{f.name} ({_code_lines(f)} lines)"
            for p in PACKAGE.rglob("*.py") for f in _functions(p) if _code_lines(f) > 60]
    assert not long, long


def test_private_torch_ops_live_in_one_place():
    """`torch.ops.<lib>._private` kernels only in lm/model/inference.py (the CPU decode speed-ups)."""
    offenders = [str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*.py")
                 if re.search(r"torch\.ops\.\w+\._", p.read_text()) and p.name != "inference.py"]
    assert not offenders, offenders


def test_readme_layout_names_every_module():
    """A newcomer finds every room from the README's layout section."""
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.name not in layout]
    assert not missing, f"README layout does not mention {missing}"
