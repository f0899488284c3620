"""`lm` end to end through LightningCLI on tiny text: fit, checkpoints, TensorBoard, validate/test,
predict, config printing/merging and clear errors for bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from lm.cli.main import main
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, run_cli_here, run_lm, scalar_tags, tiny_data  # noqa: F401

@pytest.fixture
def trained_run(tmp_path_factory, monkeypatch, corpus_files):
    """One tiny `lm fit` shared by the tests below (run in its own working directory)."""
    workdir = tmp_path_factory.mktemp("run")
    monkeypatch.chdir(workdir)
    data = tiny_data(corpus_files, workdir / "cache")
    main(["fit", "--experiment", "tiny", *TINY_MODEL, *TINY_TRAINER, *data])
    return workdir, data


def test_fit_writes_checkpoint_and_tensorboard_events(trained_run):
    workdir, _ = trained_run
    checkpoints = sorted((workdir / "checkpoints" / "tiny").glob("*.ckpt"))
    names = [c.name for c in checkpoints]
    assert "last.ckpt" in names and any(n.startswith("step") for n in names), names

    tags = scalar_tags(workdir / "logs" / "tiny")
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "val/bpb"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any(t.startswith("lr-") for t in tags)  # LearningRateMonitor
    assert tags["train/loss"][-1] < tags["train/loss"][0]  # it learned something
    for loss, ppl in zip(tags["val/loss"], tags["val/ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-4)

    checkpoint = torch.load(workdir / "checkpoints" / "tiny" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12
    assert "tokenizer" in checkpoint and json.loads(checkpoint["tokenizer"])["model"]["type"] == "BPE"
    config = checkpoint["hyper_parameters"]["config"]
    assert config["hidden_size"] == 32 and config["vocab_size"] == 300  # linked from data.vocab_size
    assert checkpoint["datamodule_hyper_parameters"]["block_size"] == config["max_position_embeddings"] == 32  # linked
    saved = yaml.safe_load((workdir / "logs" / "tiny" / "version_0" / "config.yaml").read_text())  # resolved config
    assert "block_size" not in saved["data"]  # a link's target is left out: the saved config can be run again


def test_validate_with_checkpoint_reproduces_val_loss(trained_run):
    workdir, data = trained_run
    tags = scalar_tags(workdir / "logs" / "tiny")
    best = min(tags["val/loss"])
    best_ckpt = next(c for c in (workdir / "checkpoints" / "tiny").glob("step*.ckpt"))
    # Only the checkpoint path and the data: the model config comes from the checkpoint.
    main(["validate", "--experiment", "tiny_eval", "--ckpt_path", str(best_ckpt), *TINY_TRAINER[:4], *data])
    reloaded = scalar_tags(workdir / "logs" / "tiny_eval")
    assert reloaded["val/loss"][-1] == pytest.approx(best, abs=1e-5)

    main(["test", "--experiment", "tiny_test", "--ckpt_path", str(best_ckpt), *TINY_TRAINER[:4], *data])
    test_tags = scalar_tags(workdir / "logs" / "tiny_test")
    assert {"test/loss", "test/ppl", "test/bpb"} <= set(test_tags)
    assert 0 < test_tags["test/bpb"][-1] < 10


def test_predict_writes_generations(trained_run):
    workdir, data = trained_run
    main(["predict", "--experiment", "tiny", "--ckpt_path", str(workdir / "checkpoints" / "tiny" / "last.ckpt"),
          *TINY_TRAINER[:4], *data, "--data.prompts", "[The river, A small town was]",
          "--model.sampling.max_new_tokens", "8"])
    rows = [json.loads(line) for line in (workdir / "logs" / "tiny" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The river", "A small town was"]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)

    # A prompt longer than the context (32 tokens here) is a clear error, not a traceback.
    long_prompt = "The river was built in the north of England . " * 20
    result = run_lm("predict", "--ckpt_path", str(workdir / "checkpoints" / "tiny" / "last.ckpt"), *TINY_TRAINER[:4],
                    *data, "--data.prompts", f"[{long_prompt}]", "--model.sampling.max_new_tokens", "8", cwd=workdir)
    assert result.returncode != 0
    assert "max_position_embeddings=32" in result.stderr and "truncate" in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("yaml_path", sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "experiments").rglob("*.yaml")))
def test_every_experiment_yaml_parses(yaml_path, monkeypatch, capsys):
    """Each recipe resolves with --print_config, run the way its own header comment says (verb and the
    configs before it; a file without one is an overlay on the CPU base recipe)."""
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main([*_documented_command(yaml_path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((REPO_ROOT / yaml_path).read_text())
    assert resolved["model"]["class_path"] == (written.get("model") or {}).get("class_path", "lm.modules.LanguageModel")
    for key, value in _scalar_leaves(written).items():  # every value the file sets is the resolved one
        target = resolved
        for part in key.split("."):
            if part not in target and "init_args" in target:  # a class given as class_path + init_args
                target = target["init_args"]
            target = target[part]
        assert target == value, key
    if "vocab_size" in resolved["data"]:  # pre-training data (a fine-tuning task's vocabulary is the backbone's)
        assert resolved["data"]["vocab_size"] > 256
    assert "block_size" not in _scalar_leaves(written.get("data") or {})  # the context is stated on the model only


def _documented_command(yaml_path: str) -> list[str]:
    """`[verb..., --config a.yaml, ..., --config yaml_path]` from the first `lm ... --config yaml_path`
    command in the file's header comment; by default an overlay on experiments/wikitext2_cpu.yaml."""
    text = (REPO_ROOT / yaml_path).read_text()
    header = " ".join(line.lstrip("#").strip().rstrip("\\") for line in text.splitlines() if line.startswith("#"))
    match = re.search(r"\blm ((?:finetune )?\w+)((?:\s+--config\s+[\w./-]+\.yaml)*?)\s+--config\s+" + re.escape(yaml_path), header)
    if match:  # (a data overlay documented with `lm prepare` resolves with `lm fit` alike)
        verb = match.group(1).split() if match.group(1) == "finetune fit" else ["fit"]
        return [*verb, *match.group(2).split(), "--config", yaml_path]
    return ["fit", "--config", "experiments/wikitext2_cpu.yaml", "--config", yaml_path]


def _scalar_leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """`{"a.b": value}` for every scalar a YAML file sets (lists and appended callbacks left out)."""
    leaves = {}
    for key, value in tree.items():
        if key.endswith("+") or key == "class_path":
            continue
        if isinstance(value, dict):
            leaves.update(_scalar_leaves(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_configs_merge_later_wins(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  config:\n    num_hidden_layers: 3\ntrainer:\n  max_steps: 7\n")
    result = run_lm("fit", "--config", "experiments/wikitext2_cpu.yaml", "--config", str(overlay), "--print_config",
                    cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = yaml.safe_load(result.stdout)
    base = yaml.safe_load((REPO_ROOT / "experiments" / "wikitext2_cpu.yaml").read_text())
    assert resolved["model"]["init_args"]["config"]["num_hidden_layers"] == 3
    assert resolved["trainer"]["max_steps"] == 7
    assert resolved["model"]["init_args"]["config"]["hidden_size"] == base["model"]["config"]["hidden_size"]


def test_unknown_key_and_wrong_type_get_jsonargparse_messages(tmp_path):
    result = run_lm("fit", "--config", "experiments/wikitext2_cpu.yaml", "--model.config.hiden_size", "12",
                    "--print_config", cwd=REPO_ROOT)
    assert result.returncode != 0 and "hiden_size" in result.stderr and "Traceback" not in result.stderr
    result = run_lm("fit", "--config", "experiments/wikitext2_cpu.yaml", "--data.batch_size", "many",
                    "--print_config", cwd=REPO_ROOT)
    assert result.returncode != 0 and "batch_size" in result.stderr and "Traceback" not in result.stderr


def test_bad_input_errors_are_clear(tmp_path, corpus_files):
    data = tiny_data(corpus_files, tmp_path / "cache")
    cases = {
        "heads": (["fit", *data, *TINY_TRAINER, *TINY_MODEL, "--model.config.num_attention_heads", "5"],
                  "num_attention_heads=5 does not divide hidden_size=32"),
        "vocab": (["fit", *data, "--data.vocab_size", "200", *TINY_TRAINER, *TINY_MODEL],
                  "vocab_size"),
        "missing file": (["fit", "--data.train_files", f"[{tmp_path / 'nope.txt'}]", *TINY_TRAINER, *TINY_MODEL],
                         str(tmp_path / "nope.txt")),
        "missing ckpt": (["validate", *data, "--ckpt_path", str(tmp_path / "missing.ckpt")], "missing.ckpt"),
    }
    for name, (args, expected) in cases.items():
        result = run_lm(*args, cwd=tmp_path)
        assert result.returncode != 0, name
        assert expected in result.stderr, f"{name}: {result.stderr[-1500:]}"
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr[-1500:]}"


def test_lm_help_lists_verbs():
    result = run_lm("--help", cwd=REPO_ROOT)
    assert result.returncode == 0
    for verb in ("fit", "validate", "test", "predict", "generate"):
        assert verb in result.stdout


# ------------------------------------------------------------------ the context, stated once
CPU_RECIPE = "experiments/wikitext2_cpu.yaml"


def test_the_context_reaches_the_data_windows():
    """`model.config.max_position_embeddings` is the one place of the context: `data.block_size` follows it,
    from the recipe or from the command line."""
    from lm.cli.lightning_cli import parse_recipe

    recipe = yaml.safe_load((REPO_ROOT / CPU_RECIPE).read_text())
    assert "block_size" not in recipe["data"]
    config = parse_recipe(["--config", str(REPO_ROOT / CPU_RECIPE)])
    assert config.data.block_size == config.model.init_args.config.max_position_embeddings \
        == recipe["model"]["config"]["max_position_embeddings"]
    config = parse_recipe(["--config", str(REPO_ROOT / CPU_RECIPE), "--model.config.max_position_embeddings", "64"])
    assert config.data.block_size == config.model.init_args.config.max_position_embeddings == 64


def test_a_checkpoints_context_cuts_the_evaluation_windows(trained_run, tmp_path, lm_warnings):
    """`--ckpt_path` configures the model from the checkpoint; the link then cuts the data at its context
    (32), whatever a recipe asked for the model (said in a warning); asked on the command line, it is refused."""
    from lm.cli.lightning_cli import run_lightning_cli
    from lm.errors import LMError

    workdir, data = trained_run
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  config:\n    max_position_embeddings: 64\n")
    validate = ["validate", "--experiment", "ctx_eval", "--ckpt_path", str(workdir / "checkpoints" / "tiny" / "last.ckpt"),
                *TINY_TRAINER[:4], *data]
    cli = run_lightning_cli([*validate, "--config", str(recipe)])
    assert cli.model.config.max_position_embeddings == cli.datamodule.block_size == 32
    assert [line for line in lm_warnings() if line.startswith(f"model.config.max_position_embeddings is 64 in {recipe}, "
            "but the checkpoint") and line.endswith("has 32: the checkpoint's value is used.")]
    with pytest.raises(LMError, match=r"--model.config.max_position_embeddings 64 is given, but the checkpoint .* was "
                                      r"trained with 32: the model is evaluated with the checkpoint's architecture"):
        run_lightning_cli([*validate, "--model.config.max_position_embeddings", "64"])


@pytest.fixture
def lm_warnings(monkeypatch, caplog):
    """The WARNING lines of the `lm` logger (which `lm` prints on stderr, not through the root logger)."""
    import logging

    monkeypatch.setattr(logging.getLogger("lm"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="lm")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "lm" and r.levelno == logging.WARNING]


def test_options_a_resumed_run_cannot_use_are_named(trained_run, lm_warnings):
    """On `lm fit --ckpt_path last`, a training option of the model that differs from the checkpoint's (the
    optimizer and schedule resume as saved) and a tokenizer-training flag (the checkpoint's tokenizer is used)
    are each a warning naming what is used instead; an equal value, or an option a run may change (a
    run-time one), is not; the verbs that do not train are not warned about training options."""
    from lm.cli.run_checks import check_command_line

    resume = ["--experiment", "tiny", "--ckpt_path", "last", *TINY_MODEL]  # the flags it was trained with: equal
    check_command_line(["fit", *resume, "--model.learning_rate", "1e-2", "--model.compile", "true",
                        "--data.tokenizer_kind", "char", "--data.vocab_size", "300"])
    warnings = lm_warnings()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("model.learning_rate 1e-2 (on the command line) is not used: the run resumes with "
                                  "the checkpoint's 0.003") and "--model.init_from checkpoints/tiny/last.ckpt" in warnings[0]
    assert warnings[1] == "--data.tokenizer_kind is not used: the checkpoint's own tokenizer is."
    check_command_line(["validate", *resume, "--model.learning_rate", "1e-2", "--data.vocab_size", "300"])
    assert len(lm_warnings()) == 2


@pytest.mark.parametrize("where", ["flag", "flag=", "yaml", "data", "print_config"])
def test_setting_the_block_size_is_refused_in_one_line(where, tmp_path, monkeypatch):
    """`data.block_size` is the link's target: set anywhere, it is refused with one line naming the key to
    set instead (jsonargparse alone refuses the flag tersely and drops a YAML value silently). The first case
    runs the `lm` command; the others call its `main` in this process (the same code, without a start-up)."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  block_size: 64\n")
    args = {"flag": ["--data.block_size", "64", "--trainer.max_steps", "1"],
            "flag=": ["--data.block_size=64", "--trainer.max_steps", "1"],
            "yaml": ["--config", str(overlay), "--trainer.max_steps", "1"],
            "data": ["--data", "{block_size: 64}", "--trainer.max_steps", "1"],
            "print_config": ["--data.block_size", "64", "--print_config"]}[where]
    if where == "flag":
        result = run_lm("fit", "--config", CPU_RECIPE, *args, cwd=REPO_ROOT)
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(REPO_ROOT)
        code, stderr = run_cli_here(["fit", "--config", CPU_RECIPE, *args])
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[0].startswith("lm fit: error: data.block_size is set ") and "Traceback" not in stderr
    assert "state it once, as model.config.max_position_embeddings (e.g. --model.config.max_position_embeddings 64)" \
        in lines[0], lines
    assert lines[1:] == ["(set LM_DEBUG=1 to see the traceback)"], lines
    if where == "yaml":
        assert str(overlay) in lines[0]


def test_lm_prepare_reads_the_context_as_lm_fit_does(monkeypatch):
    """`lm prepare` cuts (LitData) windows at the context `lm fit` would train with: merged across config
    files (a later overlay's model section does not drop the base's context) and linked."""
    from lm.commands import prepare
    from lm.data import TextDataModule

    seen = []

    def stop(datamodule):
        seen.append(datamodule.block_size)
        raise SystemExit(0)

    monkeypatch.setattr(TextDataModule, "prepare_data", stop)
    monkeypatch.chdir(REPO_ROOT)
    for extra, expected in (([], 512), (["--config", "experiments/distill.yaml"], 512),
                            (["--model.config.max_position_embeddings", "64"], 64)):
        with pytest.raises(SystemExit):
            prepare.main(["--config", CPU_RECIPE, *extra])
        assert seen[-1] == expected, extra
