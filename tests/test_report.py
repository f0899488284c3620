"""`lm report` on a short real run: two tiny `lm fit` runs -> PNG plots + a Markdown summary with the
config difference, parameter count and metrics."""

from __future__ import annotations

import pytest

from lm.cli.main import main
from lm.model import GPT, GPTConfig
from tests.helpers import TINY_MODEL, TINY_TRAINER, tiny_data


def test_report_writes_plots_and_summary(tmp_path, monkeypatch, corpus_files, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    data = tiny_data(corpus_files, tmp_path / "cache")
    short = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3"]
    main(["fit", "--experiment", "tiny", *TINY_MODEL, *TINY_TRAINER, *data, *short])
    # a second run under its own name (a fit never reuses an experiment's checkpoint folder)
    main(["fit", "--experiment", "tiny_lr", *TINY_MODEL, *TINY_TRAINER, *data, *short, "--model.learning_rate", "1e-3"])
    main(["report", "logs/tiny", "logs/tiny_lr", "--output", "report"])
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"loss.png", "perplexity.png", "learning_rate.png", "tokens_per_second.png", "report.md"} <= names
    assert all((tmp_path / "report" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "tiny/version_0" in markdown and "tiny_lr/version_0" in markdown
    assert "| model.init_args.learning_rate | `0.003` | `0.001` |" in markdown
    params = GPT(GPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=32)).num_parameters()
    assert f"{params / 1e6:.2f}M" in markdown
    assert "Wrote 4 plots" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "nowhere"])
