"""The context cache (lm/model/context_cache.py): its mixture, its calibration grid, generation with it,
and its calibration on the validation text during `lm fit` (saved in the checkpoint, EMA or not)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lm.io.checkpoints import load_model
from lm.evaluation.perplexity import evaluate_text_file
from lm.evaluation.token_metrics import token_nll
from lm.model import GPT, GPTConfig
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, run_lm, tb_scalars, tiny_data


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, position="rope", context_cache=True, **overrides)
    return GPT(config).eval()


def _set(model: GPT, sharpness: float, weight: float, temperature: float) -> None:
    cache = model.context_cache
    cache.sharpness.fill_(sharpness), cache.weight.fill_(weight), cache.temperature.fill_(temperature)


@torch.no_grad()
def test_mixture_is_a_distribution_that_copies_from_the_window():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    plain = torch.log_softmax(model.head(model(ids, return_hidden=True)), -1)
    assert torch.allclose(model(ids), plain, atol=1e-6)  # weight 0, temperature 1: the plain softmax
    _set(model, sharpness=8.0, weight=0.5, temperature=1.0)
    mixed = model(ids)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-5)
    assert torch.allclose(mixed[:, 0], plain[:, 0], atol=1e-6)  # nothing to copy yet at position 0
    # At position 4 (token 9) the only earlier keys are 0-3, followed by 6, 7, 8, 9: all the copy mass is on them.
    copied = mixed[0, 4, [6, 7, 8, 9]].exp().sum() - 0.5 * plain[0, 4, [6, 7, 8, 9]].exp().sum()
    assert copied == pytest.approx(0.5, abs=1e-5)
    # Repeats: each token that followed an earlier occurrence becomes far likelier than the softmax alone says.
    targets = ids[0, 6:]
    gain = mixed[0, 5:-1].gather(-1, targets[:, None]) - plain[0, 5:-1].gather(-1, targets[:, None])
    assert (gain > 0).all()
    model.train()
    assert torch.allclose(model(ids), model.head(model(ids, return_hidden=True)))  # training: the plain logits


@torch.no_grad()
def test_grid_nll_matches_the_forward_at_every_probed_point():
    model = _model()
    torch.manual_seed(1)
    ids = torch.randint(0, 12, (3, 21))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, :4] = -100  # unscored targets count in neither
    hidden = model(inputs, return_hidden=True)
    cache = model.context_cache
    grid = cache.grid_nll(model.head(hidden), hidden, *model.context_cache_inputs(hidden, inputs), targets)
    assert grid.shape == cache.grid_shape()
    for index in (0, 17, grid.numel() // 2, grid.numel() - 1):
        values = cache.set_from_grid(index)
        assert [float(cache.sharpness), float(cache.weight), float(cache.temperature)] == pytest.approx(values)
        nll, _ = token_nll(model(inputs), targets)
        assert float(nll) == pytest.approx(float(grid.flatten()[index]), rel=1e-5)


@torch.no_grad()
def test_generation_sees_the_same_distribution_with_a_kv_cache_and_left_padding():
    model = _model()
    _set(model, sharpness=6.0, weight=0.3, temperature=1.1)
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4, 9, 3, 4, 5, 3, 4]])
    full = model(ids)
    kv = model.new_kv_cache(1)
    steps = [model(ids[:, :5], kv_cache=kv)] + [model(ids[:, t:t + 1], kv_cache=kv) for t in range(5, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # The same row left-padded by 3 in a batch: padding is neither copied from nor attended to.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, position_ids=positions, attention_mask=mask)
    assert torch.allclose(out[:, 3:], full, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_runs_under_bf16_autocast(dtype):
    """bf16-mixed (what `precision: null` picks on a CPU with native bf16) runs the cache under autocast, and
    bf16-true / `lm serve --dtype bfloat16` with bf16 weights: the full forward, the KV-cache steps and the
    calibration grid all run, and give what float32 gives to bf16 rounding."""
    model = _model()
    _set(model, sharpness=6.0, weight=0.3, temperature=1.1)
    torch.manual_seed(2)
    ids = torch.randint(0, 12, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    reference = model(inputs)
    grid_reference = model.context_cache.grid_nll(model.head(model(inputs, return_hidden=True)),
                                                  model(inputs, return_hidden=True),
                                                  *model.context_cache_inputs(model(inputs, return_hidden=True), inputs),
                                                  targets)
    model = model.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(inputs)
        kv = model.new_kv_cache(2)
        steps = torch.cat([model(inputs[:, :4], kv_cache=kv)] + [model(inputs[:, t:t + 1], kv_cache=kv)
                                                                 for t in range(4, inputs.shape[1])], 1)
        hidden = model(inputs, return_hidden=True)
        grid = model.context_cache.grid_nll(model.head(hidden), hidden, *model.context_cache_inputs(hidden, inputs),
                                            targets)
    assert full.dtype == steps.dtype == torch.float32
    assert torch.allclose(full.exp(), reference.exp(), atol=3e-2)
    assert torch.allclose(steps.exp(), full.exp(), atol=3e-2)
    assert grid.dtype == torch.float64 and torch.allclose(grid, grid_reference, rtol=3e-2)


@torch.no_grad()
def test_generation_samples_the_plain_softmax_unless_asked():
    """Generation's default is the model's own distribution (the cache copies its mistakes when sampled,
    benchmarks/generation_quality.py); SamplingOptions.context_cache=True samples the mixture."""
    from lm.model import SamplingOptions, generate

    model = _model()
    _set(model, sharpness=24.0, weight=0.9, temperature=1.0)  # a cache that dominates the mixture
    prompt = [[3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4]]
    greedy = SamplingOptions(max_new_tokens=8, temperature=0)
    plain = generate(model, prompt, greedy)[0][12:]
    ids = torch.tensor(prompt)
    expected, row = [], ids
    for _ in range(8):  # greedy over the plain logits, written out
        token = model.head(model(row, return_hidden=True))[:, -1].argmax(-1, keepdim=True)
        expected.append(int(token)), (row := torch.cat([row, token], 1))
    assert plain == expected
    mixed = generate(model, prompt, greedy, context_cache=True)[0][12:]
    assert mixed[:3] == [5, 6, 7], "with the cache dominating, greedy decoding copies the repeated pattern"
    assert mixed != plain
    kv = model.new_kv_cache(1, context_cache=False)
    assert kv.hidden is None
    with pytest.raises(Exception, match="context_cache=True"):
        model(ids, kv_cache=kv)


def test_fit_calibrates_on_validation_and_the_checkpoint_keeps_it(tmp_path, corpus_files):
    """`lm fit` with the cache (and the EMA callback, whose saved weights come from its own copy): the
    validation picks the grid point, logs it, scores the calibrated model, and the checkpoint carries it."""
    trainer = list(TINY_TRAINER)
    trainer[trainer.index("--trainer.max_steps") + 1] = "20"
    result = run_lm("fit", "--experiment", "cc", *tiny_data(corpus_files, tmp_path / "cache"), *TINY_MODEL, *trainer,
                    "--model.config.context_cache", "true", "--trainer.val_check_interval", "10",
                    "--trainer.callbacks+", "lm.callbacks.ExponentialMovingAverage",
                    "--trainer.callbacks.init_args.update_starting_at_step", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    scalars = tb_scalars(tmp_path / "logs" / "cc")
    last = max(scalars["val/loss"])
    calibrated, plain = scalars["val/loss"][last], scalars["val/plain_loss"][last]
    assert calibrated <= plain + 1e-6  # the grid includes the plain softmax (weight 0, temperature 1)
    weight, temperature = scalars["val/cache_weight"][last], scalars["val/cache_temperature"][last]
    checkpoint = torch.load(tmp_path / "checkpoints" / "cc" / "last.ckpt", weights_only=True)
    assert float(checkpoint["state_dict"]["model.context_cache.weight"]) == pytest.approx(weight)
    assert float(checkpoint["state_dict"]["model.context_cache.temperature"]) == pytest.approx(temperature)
    assert (weight, temperature) != (0.0, 1.0), "the tiny corpus repeats itself: the cache should be used"
    # The ablation benchmark reads the same checkpoint four ways; its last row is the model as saved.
    model, tokenizer = load_model(tmp_path / "checkpoints" / "cc" / "last.ckpt")
    assert float(model.context_cache.weight) == pytest.approx(weight)
    as_saved = evaluate_text_file(model, tokenizer, corpus_files["test"])["bpb"]
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "context_cache_ablation.py"),
                          str(tmp_path / "checkpoints" / "cc" / "last.ckpt"), "--text_file", str(corpus_files["test"])],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:40].strip(): [float(x) for x in line[40:].split()] for line in out.stdout.splitlines()
            if line.startswith(("plain", "temperature only", "copy", "both"))}
    assert len(rows) == 4 and rows["both (as saved; lm eval)"][2] == pytest.approx(as_saved, abs=1e-4)
    assert math.isfinite(rows["plain softmax (the transformer alone)"][2])
