"""End to end on the real WikiText-2 files in ../shared/data (the offline protocol of
experiments/data/wikitext2_offline.yaml): train on wiki.valid.raw with its tail held out, then test on
wiki.test.raw from the checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from lm.cli.main import main
from tests.helpers import OFFLINE_WIKITEXT_YAML, REPO_ROOT, WIKITEXT_DIR, scalar_tags

pytestmark = pytest.mark.skipif(
    not (WIKITEXT_DIR / "wiki.valid.raw").is_file(),
    reason=f"WikiText-2 raw files not found in {WIKITEXT_DIR} (see ../shared/data/wikitext-2-raw-v1/SOURCES.md)",
)


def offline_protocol_flags() -> list[str]:
    """The protocol as experiments/data/wikitext2_offline.yaml states it, its paths (relative to the
    project root) made absolute, since this test runs in its own folder."""
    flags = []
    for key, value in yaml.safe_load(OFFLINE_WIKITEXT_YAML.read_text())["data"].items():
        if isinstance(value, list):
            value = "[" + ", ".join(str(REPO_ROOT / v) for v in value) + "]"
        flags += [f"--data.{key}", str(value)]
    return flags


def test_offline_protocol_trains_and_tests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--experiment", "wt2"]
    data = [*offline_protocol_flags(), "--data.vocab_size", "2048",
            "--data.batch_size", "16", "--data.cache_dir", str(tmp_path / "cache")]
    model = ["--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "2",
             "--model.config.num_attention_heads", "2", "--model.config.max_position_embeddings", "64",
             "--model.learning_rate", "3e-3", "--model.warmup_steps", "5"]
    trainer = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "20"]
    main(["fit", *common, *data, *model, *trainer, "--trainer.max_steps", "60", "--trainer.val_check_interval", "30"])
    ckpt = tmp_path / "checkpoints" / "wt2" / "last.ckpt"
    assert ckpt.is_file()
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 60

    main(["test", "--experiment", "wt2_test", "--ckpt_path", str(ckpt), *data, *trainer[:4],
          "--trainer.limit_test_batches", "20"])
    out = capsys.readouterr().out
    assert "test/ppl" in out and "test/bpb" in out
    tags = scalar_tags(tmp_path / "logs" / "wt2_test")
    ppl, loss, bpb = tags["test/ppl"][-1], tags["test/loss"][-1], tags["test/bpb"][-1]
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    # 60 steps of a tiny model: far better than uniform over 2048 tokens, far from good.
    assert ppl < 2048 / 2 and 1.0 < bpb < 8.0
