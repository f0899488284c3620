"""Architecture presets (experiments/variants/*.yaml) and extension by subclassing, through the CLI:
each trains a few steps on the tiny corpus, its checkpoint reloads (`lm validate --ckpt_path` gives
the logged val loss again) and generates."""

from __future__ import annotations

import pytest
import torch
import yaml

from lm.io.checkpoints import load_model
from lm.cli.main import main
from lm.model import generate_text
from tests import extension_example
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, scalar_tags, tiny_data

VARIANTS = sorted(p.stem for p in (REPO_ROOT / "experiments" / "variants").glob("*.yaml"))


def fit_validate_generate(workdir, data, name: str, model_args: list[str], capsys) -> dict:
    """Train `name`, re-validate its best checkpoint, generate from it; return the checkpoint."""
    main(["fit", "--experiment", name, *model_args, *TINY_TRAINER, *data])
    best = min(scalar_tags(workdir / "logs" / name)["val/loss"])
    best_ckpt = next((workdir / "checkpoints" / name).glob("step*.ckpt"))

    # Only the checkpoint and the data: the architecture (and model class) come from the checkpoint.
    main(["validate", "--experiment", f"{name}_eval", "--ckpt_path", str(best_ckpt), *TINY_TRAINER[:4], *data])
    assert scalar_tags(workdir / "logs" / f"{name}_eval")["val/loss"][-1] == pytest.approx(best, abs=1e-5)

    model, tokenizer = load_model(best_ckpt)
    expected = generate_text(model, tokenizer, ["The river"], max_new_tokens=8, temperature=0)[0]
    capsys.readouterr()
    main(["generate", "--ckpt_path", str(best_ckpt), "--prompt", "The river", "--temperature", "0",
          "--max_new_tokens", "8", "--dtype", "float32"])  # as `expected` (auto would pick bf16 on a bf16 CPU)
    assert capsys.readouterr().out == "The river" + expected + "\n"
    return torch.load(best_ckpt, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_preset_trains_reloads_and_generates(variant, tmp_path, monkeypatch, corpus_files, capsys):
    monkeypatch.chdir(tmp_path)
    preset = REPO_ROOT / "experiments" / "variants" / f"{variant}.yaml"
    # The preset after the sizes would not matter (it sets no size), but keep the documented order:
    # base recipe / sizes first, variant overlay after.
    checkpoint = fit_validate_generate(tmp_path, tiny_data(corpus_files, tmp_path / "cache"), variant,
                                       [*TINY_MODEL, "--config", str(preset)], capsys)
    saved = checkpoint["hyper_parameters"]["config"]
    for key, value in yaml.safe_load(preset.read_text())["model"]["config"].items():
        assert saved[key] == value, key
    assert saved["hidden_size"] == 32  # sizes still come from the command line / base recipe


def test_variants_combine_with_every_base_recipe():
    """The presets set no sizes, and their num_key_value_heads divides each base's heads."""
    from lm.model import GPTConfig

    bases = [yaml.safe_load(p.read_text()) for p in (REPO_ROOT / "experiments").glob("*.yaml")]
    bases = [b["model"]["config"] for b in bases if "config" in (b.get("model") or {})]  # pre-training recipes
    assert len(bases) >= 3
    for base_config in bases:
        for variant in VARIANTS:
            overlay = yaml.safe_load((REPO_ROOT / "experiments" / "variants" / f"{variant}.yaml").read_text())
            GPTConfig(**{**base_config, **overlay["model"]["config"]})  # raises if they do not combine


def test_subclassed_model_from_outside_the_package(tmp_path, monkeypatch, corpus_files, capsys):
    """`--model tests.extension_example.ScaledAttentionModel`: custom attention + loss, no change to lm."""
    monkeypatch.chdir(tmp_path)
    attention_calls = extension_example.ScaledAttention.calls
    loss_calls = extension_example.ScaledAttentionModel.loss_calls
    class_path = "tests.extension_example.ScaledAttentionModel"
    checkpoint = fit_validate_generate(
        tmp_path, tiny_data(corpus_files, tmp_path / "cache"), "custom",
        ["--model", class_path, *TINY_MODEL, "--model.label_smoothing", "0.05"], capsys,
    )
    assert extension_example.ScaledAttention.calls > attention_calls  # the custom attention ran
    assert extension_example.ScaledAttentionModel.loss_calls > loss_calls  # and the custom loss
    hparams = checkpoint["hyper_parameters"]
    assert hparams["_class_path"] == class_path and hparams["label_smoothing"] == 0.05
    head_scale = checkpoint["state_dict"]["model.layers.0.attn.head_scale"]
    assert head_scale.shape == (4,) and not torch.equal(head_scale, torch.ones(4))  # trained
    best = next((tmp_path / "checkpoints" / "custom").glob("step*.ckpt"))
    model, _ = load_model(best)
    assert isinstance(model.layers[0].attn, extension_example.ScaledAttention)
    # `--ckpt_path` alone restores the subclass and its own saved arguments (not their defaults)...
    from lm.cli.lightning_cli import run_lightning_cli

    data = tiny_data(corpus_files, tmp_path / "cache")
    cli = run_lightning_cli(["validate", "--experiment", "custom_again", "--ckpt_path", str(best), *TINY_TRAINER[:4], *data])
    assert isinstance(cli.model, extension_example.ScaledAttentionModel) and cli.model.label_smoothing == 0.05
    # ...while run-time options stay this run's.
    cli = run_lightning_cli(["validate", "--experiment", "custom_again", "--ckpt_path", str(best),
                             "--model.sampling.temperature", "0", *TINY_TRAINER[:4], *data])
    assert cli.model.sampling.temperature == 0 and cli.model.label_smoothing == 0.05
