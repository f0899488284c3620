"""Training-time levers of issue 28 that leave the trained network as it is: `GPTConfig.stochastic_depth` (blocks'
branches dropped per sequence), `GPTConfig.token_noise` (unigram noising of the inputs) and
`LanguageModel(multi_token_prediction=...)` (extra heads predicting tokens further ahead, kept out of the network) and
`LanguageModel(copy_distillation=...)` (the context cache's copy distribution as a soft target).
Each is checked for what it does in training, for doing nothing in evaluation, and through `lm fit` + `lm generate`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm.cli.main import main
from lm.errors import LMError
from lm.io.checkpoints import load_model, read_checkpoint
from lm.model import GPTConfig, build_gpt
from lm.modules.copy_distillation import copy_distillation_loss
from lm.modules.language_model import LanguageModel
from lm.modules.optimizers import MuonWithAdamW
from tests.conftest import write_corpus_files
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, assert_lm_generate_matches, tiny_data

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=32)


def ids(batch: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- stochastic depth
def test_stochastic_depth_rises_linearly_from_the_first_block_to_the_last():
    model = build_gpt(GPTConfig(**TINY, stochastic_depth=0.3))
    assert [round(block.drop_path, 6) for block in model.layers] == [0.0, 0.1, 0.2, 0.3]
    assert build_gpt(GPTConfig(**{**TINY, "num_hidden_layers": 1}, stochastic_depth=0.3)).layers[0].drop_path == 0.0


def test_stochastic_depth_drops_whole_sequences_and_keeps_the_expectation():
    block = build_gpt(GPTConfig(**TINY, stochastic_depth=0.5)).layers[-1].train()
    torch.manual_seed(0)
    out = block._drop_path(torch.ones(4000, 3, 2))
    per_sequence = out.flatten(1)
    assert ((per_sequence == 0).all(1) | (per_sequence == 2.0).all(1)).all()  # a sequence is dropped whole or kept
    assert abs(out.mean().item() - 1.0) < 0.05  # kept ones scaled by 1 / (1 - p)
    assert torch.equal(block.eval()._drop_path(torch.ones(8, 3, 2)), torch.ones(8, 3, 2))


# ---------------------------------------------------------------------------------------------- token noise
def test_token_noise_replaces_that_share_of_inputs_by_tokens_of_the_batch():
    model = build_gpt(GPTConfig(**TINY, token_noise=0.3))
    x = torch.arange(4000).remainder(VOCAB).view(2, 2000)
    torch.manual_seed(0)
    noised = model._noised_tokens(x)
    changed = (noised != x).float().mean().item()
    assert 0.25 < changed < 0.31  # 0.3, less the draws that picked the token itself (1 in 97 here)
    assert set(noised.unique().tolist()) <= set(x.unique().tolist())
    only_sevens = torch.full((3, 50), 7)
    assert torch.equal(model._noised_tokens(only_sevens), only_sevens)  # a batch of one token has no other to draw


@pytest.mark.parametrize("rate", [dict(stochastic_depth=0.9), dict(token_noise=0.5)])
def test_the_rates_change_training_only(rate):
    torch.manual_seed(0)
    plain = build_gpt(GPTConfig(**TINY))
    regularized = build_gpt(GPTConfig(**TINY, **rate))
    regularized.load_state_dict(plain.state_dict())  # no parameter of its own
    x = ids()
    assert torch.equal(plain.eval()(x), regularized.eval()(x))
    torch.manual_seed(3)
    trained = regularized.train()(x)
    torch.manual_seed(3)
    assert not torch.allclose(trained, plain.train()(x))


@pytest.mark.parametrize("field", ["token_noise", "stochastic_depth"])
@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_regularizer_rates_outside_0_1_are_refused(field, value):
    with pytest.raises(LMError, match=rf"{field} must be in \[0, 1\)"):
        GPTConfig(**TINY, **{field: value})


# ---------------------------------------------------------------------------------------------- multi-token prediction
def tiny_module(**kwargs) -> LanguageModel:
    torch.manual_seed(0)
    module = LanguageModel(config=GPTConfig(**TINY), optimizer="muon", **kwargs)
    module.log = lambda *args, **kw: None  # no Trainer attached
    return module


def test_future_heads_start_as_the_next_token_prediction_and_add_their_weighted_loss():
    module = tiny_module(multi_token_prediction=2, multi_token_weight=0.25).eval()
    x, y = ids(seed=1), ids(seed=2)
    logits = module.model(x)
    main_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    # W starts at zero: head k reads the same hidden state, scored against the targets k places further on.
    future = [F.cross_entropy(logits[:, :-k].flatten(0, 1), y[:, k:].flatten()) for k in (1, 2)]
    expected = main_loss + 0.25 * (future[0] + future[1]) / 2
    assert torch.allclose(module.training_loss((x, y)), expected, atol=1e-5)


def test_future_heads_are_trained_by_muon_and_stay_out_of_the_network(tmp_path, monkeypatch):
    module = tiny_module(multi_token_prediction=1)
    optimizer = module.new_optimizer()
    assert isinstance(optimizer, MuonWithAdamW)
    muon_ids = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    adamw_ids = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    assert id(module.future_heads[0].proj.weight) in muon_ids
    assert id(module.future_heads[0].norm.weight) in adamw_ids
    assert id(module.model.lm_head.weight) in adamw_ids and id(module.model.lm_head.weight) not in muon_ids
    x, y = ids(seed=1), ids(seed=2)
    module.training_loss((x, y)).backward()
    assert module.future_heads[0].proj.weight.grad.abs().sum() > 0

    data = tiny_data(write_corpus_files(tmp_path), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--experiment", "mtp", *TINY_MODEL, *TINY_TRAINER, *data, "--model.multi_token_prediction", "1",
          "--model.copy_distillation", "0.2", "--model.copy_distillation_until", "0.5", "--model.config.context_cache", "true", "--model.config.stochastic_depth", "0.2", "--model.config.token_noise", "0.1",
          "--model.optimizer", "muon", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"])
    ckpt = tmp_path / "checkpoints" / "mtp" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    assert any(k.startswith("future_heads.") for k in state)  # a resume keeps training them
    model, _ = load_model(ckpt)  # the network alone: what every other verb reads
    assert not any("future" in k for k in model.state_dict())
    assert model.config.stochastic_depth == 0.2 and model.config.token_noise == 0.1
    assert_lm_generate_matches(ckpt, cwd=tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(multi_token_prediction=-1), "multi_token_prediction must be >= 0"),
    (dict(multi_token_prediction=1, multi_token_weight=-0.5), "multi_token_weight >= 0"),
    (dict(multi_token_prediction=1, loss_chunk_size=64), "plain loss path: drop model.loss_chunk_size"),
])
def test_bad_multi_token_settings_are_refused(kwargs, message):
    with pytest.raises(LMError, match=message):
        LanguageModel(config=GPTConfig(**TINY), **kwargs)


# ---------------------------------------------------------------------------------------------- copy distillation
def test_copy_distillation_is_the_cross_entropy_of_hard_and_copy_targets_mixed():
    """Against the definition, position by position: (1 - w) x the mean next-token cross-entropy + w x the mean over
    positions with history of the cross-entropy of the copy distribution: softmax(sharpness x cosine) over the earlier
    positions (masked targets offer nothing and are not scored), each offering the token that followed it."""
    torch.manual_seed(0)
    B, T, D = 2, 12, 16
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(B, T, VOCAB, dtype=dtype, requires_grad=True)
        hidden, targets = torch.randn(B, T, D), ids(B, T, seed=4)
        targets[0, 3] = targets[1, -1] = -100
        loss = copy_distillation_loss(logits, hidden, targets, sharpness=8.0, weight=0.3)
        loss.backward()
        ours, logits.grad = logits.grad.clone(), None
        log_p = torch.log_softmax(logits.float(), -1)
        scored = targets != -100
        hard = -(log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored).sum() / scored.sum()
        unit = F.normalize(hidden, dim=-1)
        copy_terms = []
        for b in range(B):
            for t in range(1, T):
                keys = [i for i in range(t) if i < T - 1 and targets[b, i] != -100]
                if keys and targets[b, t] != -100:
                    attention = torch.softmax(8.0 * unit[b, keys] @ unit[b, t], 0)
                    copy_terms.append(-(attention * log_p[b, t, targets[b, keys]]).sum())
        reference = 0.7 * hard + 0.3 * torch.stack(copy_terms).mean()
        reference.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.float(), logits.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-3 if dtype == torch.bfloat16 else 1e-7)
        logits.grad = None
    plain = copy_distillation_loss(logits, hidden, targets, sharpness=8.0, weight=0.0)
    torch.testing.assert_close(plain, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))


def test_copy_distillation_changes_the_objective_not_the_network():
    torch.manual_seed(0)
    plain = LanguageModel(config=GPTConfig(**TINY, context_cache=True))
    distilled = LanguageModel(config=GPTConfig(**TINY, context_cache=True), copy_distillation=0.2)
    distilled.load_state_dict(plain.state_dict())  # no parameter or buffer of its own
    for module in (plain, distilled):
        module.log = lambda *args, **kw: None
    x, y = ids(seed=1), ids(seed=2)
    assert torch.equal(plain.eval()(x), distilled.eval()(x))
    hidden = plain.model(x, return_hidden=True)
    expected = copy_distillation_loss(plain.model.head(hidden), hidden, y, plain.model.context_cache.sharpness.item(), 0.2)
    torch.testing.assert_close(distilled.training_loss((x, y)), expected)  # the cache's sharpness
    assert not torch.allclose(distilled.training_loss((x, y)), plain.training_loss((x, y)))
    distilled.model.context_cache.sharpness.fill_(16.0)  # the calibrated value, when a validation has set it
    hidden = distilled.model(x, return_hidden=True)
    torch.testing.assert_close(distilled.training_loss((x, y)),
                               copy_distillation_loss(distilled.model.head(hidden), hidden, y, 16.0, 0.2))


def test_copy_distillation_until_decays_the_share_to_zero_then_trains_on_the_plain_objective():
    torch.manual_seed(0)
    plain = LanguageModel(config=GPTConfig(**TINY, context_cache=True))
    distilled = LanguageModel(config=GPTConfig(**TINY, context_cache=True), copy_distillation=0.2,
                              copy_distillation_until=0.5)
    distilled.load_state_dict(plain.state_dict())
    logged = {}
    distilled.log = lambda name, value, **kw: logged.__setitem__(name, value)
    plain.log = lambda *args, **kw: None
    x, y = ids(seed=1), ids(seed=2)
    hidden = plain.model(x, return_hidden=True)
    sharpness = plain.model.context_cache.sharpness.item()
    for progress, weight in [(-0.1, 0.2), (0.0, 0.2), (0.25, 0.1), (0.5, 0.0), (0.9, 0.0)]:  # -0.1: warm-up
        distilled.schedule_progress = lambda step, progress=progress: progress
        assert distilled._copy_distillation_weight() == pytest.approx(weight)
        assert logged["train/copy_distillation"] == pytest.approx(weight)
        expected = (copy_distillation_loss(plain.model.head(hidden), hidden, y, sharpness, weight) if weight
                    else plain.training_loss((x, y)))
        torch.testing.assert_close(distilled.training_loss((x, y)), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(copy_distillation=0.1, copy_distillation_until=0.0), r"copy_distillation_until .* in \(0, 1\], got 0.0"),
    (dict(copy_distillation=0.1, copy_distillation_until=1.5), r"in \(0, 1\], got 1.5"),
    (dict(copy_distillation_until=0.5), "schedules copy distillation, which is off: set model.copy_distillation"),
    (dict(copy_distillation=-0.1), r"copy_distillation is the soft target's share of the objective, in \[0, 1\)"),
    (dict(copy_distillation=1.0), r"in \[0, 1\), got 1.0"),
    (dict(copy_distillation=0.1, loss_chunk_size=64), "whole logits of a batch: drop model.loss_chunk_size"),
])
def test_bad_copy_distillation_settings_are_refused(kwargs, message):
    with pytest.raises(LMError, match=message):
        LanguageModel(config=GPTConfig(**TINY), **kwargs)


class _OwnObjective(LanguageModel):
    def compute_loss(self, logits, targets):
        return logits.float().logsumexp(-1).mean()


def test_copy_distillation_refuses_a_subclass_with_its_own_objective():
    with pytest.raises(LMError, match="_OwnObjective overrides compute_loss"):
        _OwnObjective(config=GPTConfig(**TINY), copy_distillation=0.1)
    _OwnObjective(config=GPTConfig(**TINY))


class _LogitsOnlyModel(LanguageModel):
    """A subclass whose network maps ids to logits and has no `head` (what `build_model` allows)."""

    def build_model(self, config):
        return torch.nn.Sequential(torch.nn.Embedding(config.vocab_size, 8), torch.nn.Linear(8, config.vocab_size))


@pytest.mark.parametrize("option, value", [("multi_token_prediction", 1), ("loss_chunk_size", 64),
                                           ("copy_distillation", 0.1)])
def test_options_that_read_hidden_states_refuse_a_network_without_a_head(option, value):
    with pytest.raises(LMError, match=rf"model.{option} needs a network with a `head` method .* Sequential"):
        _LogitsOnlyModel(config=GPTConfig(**TINY), **{option: value})
    _LogitsOnlyModel(config=GPTConfig(**TINY))  # without the option the network is welcome


def test_lm_plan_says_it_does_not_estimate_the_future_heads_or_copy_distillation():
    from lm.plan.recipe import read_recipe

    recipe = ["--config", str(REPO_ROOT / "experiments" / "wikitext2_cpu.yaml"),
              "--model.config.stochastic_depth", "0.1", "--model.config.token_noise", "0.1"]
    assert read_recipe(recipe, devices=1, nodes=1).model.parameters > 0  # training-only rates: planned as usual
    with pytest.raises(LMError, match="does not estimate multi-token prediction"):
        read_recipe([*recipe, "--model.multi_token_prediction", "1"], devices=1, nodes=1)
    with pytest.raises(LMError, match="does not estimate copy distillation"):
        read_recipe([*recipe, "--model.copy_distillation", "0.1"], devices=1, nodes=1)
