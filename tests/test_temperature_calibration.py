"""The network's temperature calibrated on validation and folded into checkpoints
(lm/modules/temperature_calibration.py, `LanguageModel(calibrate_temperature=True)`)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lm.errors import LMError
from lm.io.checkpoints import load_model
from lm.model import GPTConfig, build_gpt
from lm.modules.init_from import checkpoint_parts
from lm.modules.language_model import LanguageModel
from lm.modules.temperature_calibration import CHECKPOINT_KEY, fold_temperature, unfold_temperature
from tests.helpers import TINY_MODEL, TINY_TRAINER, run_lm, tb_scalars, tiny_data

TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)


def _network(**overrides):
    torch.manual_seed(0)
    network = build_gpt(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # a trained-looking final norm (not all ones / zeros)
        network.norm.weight.uniform_(0.5, 1.5)
        network.norm.bias.uniform_(-0.2, 0.2)
    return network


@torch.no_grad()
def test_a_fold_divides_the_logits_keeps_the_cache_mixture_and_unfolds_exactly():
    network = _network(context_cache=True)
    network.context_cache.sharpness.fill_(8.0), network.context_cache.weight.fill_(0.3)
    network.context_cache.temperature.fill_(1.1)
    live = {k: v.clone() for k, v in network.state_dict().items()}
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()}}
    fold_temperature(checkpoint, 1.25)
    assert all(torch.equal(v, live[k]) for k, v in network.state_dict().items())  # the live model is untouched
    folded = copy.deepcopy(network)
    folded.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(folded(ids), network(ids) / 1.25)
    torch.testing.assert_close(folded(ids, context_cache=True), network(ids, context_cache=True))
    assert unfold_temperature(checkpoint) == 1.25 and CHECKPOINT_KEY not in checkpoint
    assert all(torch.equal(checkpoint["state_dict"][f"model.{k}"], v) for k, v in live.items())  # bit for bit
    assert unfold_temperature({"state_dict": {}}) is None  # a checkpoint never folded


def test_a_resumed_fit_trains_from_the_unfolded_weights_and_other_verbs_keep_the_fold():
    module = LanguageModel(config=GPTConfig(**TINY), calibrate_temperature=True)
    module.network_temperature = 1.3
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    trained = module.state_dict()["model.norm.weight"]
    torch.testing.assert_close(checkpoint["state_dict"]["model.norm.weight"], trained / 1.3)
    for fn, folded in (("test", True), ("validate", True), ("predict", True), ("fit", False)):
        loaded, resumed = copy.deepcopy(checkpoint), LanguageModel(config=GPTConfig(**TINY), calibrate_temperature=True)
        resumed._trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        resumed.on_load_checkpoint(loaded)
        weight = loaded["state_dict"]["model.norm.weight"]
        assert torch.equal(weight, trained / 1.3 if folded else trained), fn
        assert resumed.network_temperature == (None if folded else 1.3)


def test_a_new_run_from_a_folded_checkpoint_starts_from_the_trained_weights(tmp_path):
    """--model.init_from and the fine-tuning modules read `checkpoint_parts`: the network as trained, not calibrated."""
    network = _network()
    checkpoint = {"hyper_parameters": {"config": network.config.to_dict()},
                  "state_dict": {f"model.{k}": v.clone() for k, v in network.state_dict().items()}}
    fold_temperature(checkpoint, 1.2)
    torch.save(checkpoint, tmp_path / "folded.ckpt")
    parts = checkpoint_parts(tmp_path / "folded.ckpt")
    assert torch.equal(parts.state_dict["norm.weight"], network.norm.weight)
    assert torch.equal(parts.state_dict["norm.bias"], network.norm.bias)


def test_a_network_the_fold_would_not_be_exact_for_is_refused():
    with pytest.raises(LMError, match="no logit_softcap"):
        LanguageModel(config=GPTConfig(**TINY, logit_softcap=30.0), calibrate_temperature=True)


@pytest.mark.parametrize("strategy, refused", [
    (dict(kind="FSDPStrategy", state_dict_type="sharded"), True),
    (dict(kind="ModelParallelStrategy", save_distributed_checkpoint=True), True),
    (dict(kind="FSDPStrategy", state_dict_type="full"), False),
    (dict(kind="ModelParallelStrategy", save_distributed_checkpoint=False), False),  # fsdp2_cpu.yaml's
    (dict(kind="SingleDeviceStrategy", device="cpu"), False),
])
def test_a_strategy_that_saves_sharded_checkpoints_is_refused_before_training(strategy, refused, monkeypatch):
    import lightning.pytorch.strategies as strategies

    kind = strategy.pop("kind")
    trainer = SimpleNamespace(strategy=getattr(strategies, kind)(**strategy), datamodule=None)
    module = LanguageModel(config=GPTConfig(**TINY), calibrate_temperature=True)
    monkeypatch.setattr(LanguageModel, "trainer", property(lambda self: trainer))
    if refused:
        with pytest.raises(LMError, match=f"this {kind} saves sharded checkpoints. Save full ones"):
            module.setup("fit")
    else:
        module.setup("fit")
    module.setup("validate")  # nothing is saved outside a fit: no check


@torch.no_grad()
def test_validation_by_chunks_of_the_logits_sums_what_whole_logits_do():
    """With loss_chunk_size (the memory lever), validation makes the logits a chunk at a time: the same sums."""
    torch.manual_seed(0)
    whole = LanguageModel(config=GPTConfig(**TINY), calibrate_temperature=True).eval()
    chunked = LanguageModel(config=GPTConfig(**TINY), calibrate_temperature=True, loss_chunk_size=7).eval()
    chunked.load_state_dict(whole.state_dict())
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(3))
    targets[0, :5] = -100
    for module in (whole, chunked):
        module._eval_step((ids, targets), module.val_metrics)
    for name in ("nll_sum", "num_tokens"):
        torch.testing.assert_close(getattr(chunked.val_metrics, name), getattr(whole.val_metrics, name))
        torch.testing.assert_close(getattr(chunked.temperature_metrics, name), getattr(whole.temperature_metrics, name))


def test_fit_picks_a_temperature_and_the_saved_model_scores_what_validation_calibrated(tmp_path, corpus_files):
    """lm fit (with the EMA callback and the context cache, as the recipe): validation logs the pick, the checkpoint
    carries it folded, and `lm validate` of that checkpoint scores exactly the calibrated loss training logged."""
    data = tiny_data(corpus_files, tmp_path / "cache", test=False)
    common = ["--experiment", "cal", *data, *TINY_MODEL, *TINY_TRAINER, "--model.calibrate_temperature", "true",
              "--model.config.context_cache", "true", "--trainer.callbacks+", "lm.callbacks.ExponentialMovingAverage",
              "--trainer.callbacks.init_args.update_starting_at_step", "2"]
    result = run_lm("fit", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = tb_scalars(tmp_path / "logs" / "cal")
    last = max(scalars["val/temperature"])
    temperature = scalars["val/temperature"][last]
    assert scalars["val/calibrated_loss"][last] <= scalars["val/loss"][last] + 1e-6  # the grid holds 1.0
    ckpt = tmp_path / "checkpoints" / "cal" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved[CHECKPOINT_KEY]["temperature"] == pytest.approx(temperature)
    model, _ = load_model(ckpt)
    torch.testing.assert_close(model.norm.weight, saved[CHECKPOINT_KEY]["trained"]["model.norm.weight"] / temperature)

    assert model.folded_temperature == pytest.approx(temperature)
    result = run_lm("eval", "--ckpt_path", str(ckpt), "--text_files", str(corpus_files["test"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"temperature {temperature:g}, chosen on the validation text and folded" in result.stdout

    result = run_lm("validate", *common, "--experiment", "cal-validate", "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    validated = tb_scalars(tmp_path / "logs" / "cal-validate")["val/loss"]
    assert list(validated.values())[-1] == pytest.approx(scalars["val/calibrated_loss"][last], abs=1e-4)
