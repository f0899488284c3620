"""The context cache (lm/model/context_cache.py), an extension of the plain GPT: its mixture, its calibration
grid, generation with it, and its calibration on the validation text during `lm fit`
(lm/callbacks/context_cache_calibration.py; saved in the checkpoint, EMA or not)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lm.io.checkpoints import load_model
from lm.evaluation.perplexity import evaluate_text_file, score_windows_both, window_spans
from lm.evaluation.token_losses import target_log_probs_by_temperature, token_nll
from lm.model import GPT, ContextKVCache, GPTConfig, GPTWithContextCache, KVCache, build_gpt
from lm.model.context_cache import cache_inputs
from tests.helpers import REPO_ROOT, TINY_MODEL, TINY_TRAINER, run_lm, tb_scalars, tiny_data


def _model(**overrides) -> GPTWithContextCache:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, position="rope", context_cache=True, **overrides)
    return build_gpt(config).eval()


def _set(model: GPT, sharpness: float, weight: float, temperature: float) -> None:
    cache = model.context_cache
    cache.sharpness.fill_(sharpness), cache.weight.fill_(weight), cache.temperature.fill_(temperature)


@torch.no_grad()
def test_mixture_is_a_distribution_that_copies_from_the_window():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    plain = torch.log_softmax(model.head(model(ids, return_hidden=True)), -1)
    assert torch.allclose(model(ids, context_cache=True), plain, atol=1e-6)  # weight 0, temperature 1: the plain softmax
    _set(model, sharpness=8.0, weight=0.5, temperature=1.0)
    assert torch.allclose(model(ids), model.head(model(ids, return_hidden=True)))  # unasked: the network's logits
    mixed = model(ids, context_cache=True)
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
    assert torch.allclose(model(ids, context_cache=True), model.head(model(ids, return_hidden=True)))  # training: plain


@torch.no_grad()
def test_grid_nll_matches_the_forward_at_every_probed_point():
    model = _model()
    torch.manual_seed(1)
    ids = torch.randint(0, 12, (3, 21))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, :4] = -100  # unscored targets count in neither
    hidden = model(inputs, return_hidden=True)
    cache = model.context_cache
    grid = cache.grid_nll(model.head(hidden), hidden, *cache_inputs(hidden, inputs), targets)
    assert grid.shape == cache.grid_shape()
    for index in (0, 17, grid.numel() // 2, grid.numel() - 1):
        values = cache.set_from_grid(index)
        assert [float(cache.sharpness), float(cache.weight), float(cache.temperature)] == pytest.approx(values)
        nll, _ = token_nll(model(inputs, context_cache=True), targets)
        assert float(nll) == pytest.approx(float(grid.flatten()[index]), rel=1e-5)


@torch.no_grad()
def test_generation_sees_the_same_distribution_with_a_kv_cache_and_left_padding():
    model = _model()
    _set(model, sharpness=6.0, weight=0.3, temperature=1.1)
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4, 9, 3, 4, 5, 3, 4]])
    full = model(ids, context_cache=True)
    kv = model.new_kv_cache(1, context_cache=True)
    steps = [model(ids[:, :5], kv_cache=kv, context_cache=True)] + [
        model(ids[:, t:t + 1], kv_cache=kv, context_cache=True) for t in range(5, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # The same row left-padded by 3 in a batch: padding is neither copied from nor attended to.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, position_ids=positions, attention_mask=mask, context_cache=True)
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
    reference = model(inputs, context_cache=True)
    hidden = model(inputs, return_hidden=True)
    grid_reference = model.context_cache.grid_nll(model.head(hidden), hidden, *cache_inputs(hidden, inputs), targets)
    model = model.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(inputs, context_cache=True)
        kv = model.new_kv_cache(2, context_cache=True)
        steps = torch.cat([model(inputs[:, :4], kv_cache=kv, context_cache=True)] + [
            model(inputs[:, t:t + 1], kv_cache=kv, context_cache=True) for t in range(4, inputs.shape[1])], 1)
        hidden = model(inputs, return_hidden=True)
        grid = model.context_cache.grid_nll(model.head(hidden), hidden, *cache_inputs(hidden, inputs), targets)
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
    kv = model.new_kv_cache(1)
    assert type(kv) is KVCache and isinstance(model.new_kv_cache(1, context_cache=True), ContextKVCache)
    with pytest.raises(Exception, match="context_cache=True"):
        model(ids, kv_cache=kv, context_cache=True)


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
    calibrated, plain = scalars["val/cache_loss"][last], scalars["val/loss"][last]
    assert calibrated <= plain + 1e-6  # the grid includes the plain softmax (weight 0, temperature 1)
    assert scalars["val/cache_bpb"][last] < scalars["val/bpb"][last]
    weight, temperature = scalars["val/cache_weight"][last], scalars["val/cache_temperature"][last]
    checkpoint = torch.load(tmp_path / "checkpoints" / "cc" / "last.ckpt", weights_only=True)
    assert float(checkpoint["state_dict"]["model.context_cache.weight"]) == pytest.approx(weight)
    assert float(checkpoint["state_dict"]["model.context_cache.temperature"]) == pytest.approx(temperature)
    assert (weight, temperature) != (0.0, 1.0), "the tiny corpus repeats itself: the cache should be used"
    # The ablation benchmark reads the same checkpoint four ways; its last row is the model as saved.
    model, tokenizer = load_model(tmp_path / "checkpoints" / "cc" / "last.ckpt")
    assert float(model.context_cache.weight) == pytest.approx(weight)
    as_saved = evaluate_text_file(model, tokenizer, corpus_files["test"], context_cache=True)["bpb"]
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "context_cache_ablation.py"),
                          str(tmp_path / "checkpoints" / "cc" / "last.ckpt"), "--text_file", str(corpus_files["test"])],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:40].strip(): [float(x) for x in line[40:].split()] for line in out.stdout.splitlines()
            if line.startswith(("plain", "temperature only", "copy", "both"))}
    assert len(rows) == 4 and rows["both (as saved; lm eval's cache row)"][2] == pytest.approx(as_saved, abs=1e-4)
    assert math.isfinite(rows["plain softmax (the transformer alone)"][2])


@torch.no_grad()
def test_scoring_both_distributions_in_one_pass_equals_the_models_own_forwards():
    """lm eval scores the network and the mixture from one pass (score_windows_both); each must equal what
    the model's own forward gives, window by window, with right-padded batches."""
    model = _model()
    _set(model, sharpness=8.0, weight=0.3, temperature=0.9)
    stream = torch.randint(0, 40, (150,))
    spans = window_spans(len(stream), 32, stride=24)
    both = score_windows_both(model, stream, spans, batch_size=3, distributions=(False, True))
    for cache in (False, True):
        nll, tokens = 0.0, 0
        for s in spans:
            inputs = stream[s.begin:s.end].unsqueeze(0)
            targets = stream[s.begin + 1:s.end + 1].clone().unsqueeze(0)
            targets[:, :s.score_from] = -100
            part, count = token_nll(model(inputs, context_cache=cache), targets)
            nll, tokens = nll + float(part), tokens + int(count)
        assert both[cache][1] == tokens == len(stream) - 1
        assert both[cache][0] == pytest.approx(nll, rel=1e-5)
    assert both[True][0] != pytest.approx(both[False][0], rel=1e-3)  # the mixture is not the softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_at_the_targets_by_chunks_equal_the_whole_log_softmax(dtype):
    """Scoring's log-probabilities at the targets, made a chunk of positions at a time at several temperatures,
    equal the float32 log-softmax of the whole."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    hidden, targets = torch.randn(3, 7, 16, dtype=dtype), torch.randint(0, 50, (3, 7))
    logits = head(hidden)
    temperatures = (1.0, torch.tensor(0.8), 1.3, 1.0)  # each chunk is rescaled in place from the last temperature
    expected = torch.stack([torch.log_softmax(logits.float() / t, -1).gather(-1, targets[..., None])[..., 0]
                            for t in temperatures])
    for rows in (1, 5, 21, 128):  # 21 positions: one chunk, exact chunks, a last short chunk
        before = logits.clone()
        log_probs = target_log_probs_by_temperature(logits, targets, temperatures, rows=rows)
        assert log_probs.shape == (4, 3, 7) and log_probs.dtype == torch.float32
        torch.testing.assert_close(log_probs, expected)
        assert torch.equal(logits, before)  # never the caller's logits (float32: .float() is not a copy)


def test_the_plain_network_knows_nothing_of_the_cache():
    """GPT and KVCache carry no cache state; the extension adds exactly its three scalars and the history."""
    config = GPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, context_cache=True)
    with pytest.raises(Exception, match="build_gpt"):
        GPT(config)
    model = _model()
    plain = model.without_context_cache()
    assert type(plain) is GPT and not plain.config.context_cache
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {"context_cache.sharpness", "context_cache.weight", "context_cache.temperature"}
    ids = torch.randint(0, 40, (2, 9))
    assert torch.equal(plain(ids), model(ids))
    assert not hasattr(plain.new_kv_cache(1), "hidden")


def test_lm_test_and_lm_eval_report_the_network_and_the_cache_under_their_own_names(tmp_path, corpus_files):
    data = tiny_data(corpus_files, tmp_path / "cache")
    trainer = list(TINY_TRAINER)
    fit = run_lm("fit", "--experiment", "cc", *data, *TINY_MODEL, *trainer, "--model.config.context_cache", "true",
                 cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = tmp_path / "checkpoints" / "cc" / "last.ckpt"
    test = run_lm("test", "--experiment", "cc_test", "--ckpt_path", str(ckpt), *data, *trainer[:4], cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    tags = tb_scalars(tmp_path / "logs" / "cc_test")
    model, tokenizer = load_model(ckpt)
    plain = evaluate_text_file(model, tokenizer, corpus_files["test"])
    assert plain["bpb"] == pytest.approx(evaluate_text_file(model.without_context_cache(), tokenizer,
                                                            corpus_files["test"])["bpb"], rel=1e-6)
    assert {"test/bpb", "test/cache_bpb"} <= set(tags)
    out = run_lm("eval", "--ckpt_path", str(ckpt), "--text_files", str(corpus_files["test"]), "--output",
                 str(tmp_path / "eval.json"), "--dtype", "float32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    rows = json.loads((tmp_path / "eval.json").read_text())["text"]
    assert [r["context_cache"] for r in rows] == [False, True]
    assert rows[0]["bpb"] == pytest.approx(plain["bpb"], rel=1e-5)
    assert rows[1]["bpb"] == pytest.approx(evaluate_text_file(model, tokenizer, corpus_files["test"],
                                                              context_cache=True)["bpb"], rel=1e-5)
    # bfloat16 scoring (`--dtype auto` on a CPU with native bf16): within bf16's rounding of the float32 figures
    out = run_lm("eval", "--ckpt_path", str(ckpt), "--text_files", str(corpus_files["test"]), "--output",
                 str(tmp_path / "eval-bf16.json"), "--dtype", "bfloat16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    bf16_rows = json.loads((tmp_path / "eval-bf16.json").read_text())["text"]
    assert [r["dtype"] for r in bf16_rows] == ["bfloat16"] * 2 and rows[0]["dtype"] == "float32"
    for bf16_row, row in zip(bf16_rows, rows):
        assert bf16_row["bpb"] == pytest.approx(row["bpb"], rel=5e-3)
    for flag, expected in (("false", [False]), ("true", [True])):  # the verb's flag, not the sampling field
        out = run_lm("eval", "--ckpt_path", str(ckpt), "--text_files", str(corpus_files["test"]), "--context_cache",
                     flag, "--output", str(tmp_path / f"eval-{flag}.json"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads((tmp_path / f"eval-{flag}.json").read_text())["text"]
        assert [r["context_cache"] for r in rows] == expected


def test_calibration_reads_the_steps_own_hidden_states(tmp_path, corpus_files):
    """The calibration hooks the final norm: each validation batch runs the blocks once, not twice, and the
    grid it fills gives the same figures as a second forward would."""
    import lightning as L

    from lm.data import TextDataModule
    from lm.modules import LanguageModel

    data = TextDataModule(train_files=str(corpus_files["train"]), val_files=str(corpus_files["valid"]), vocab_size=300,
                          block_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    module = LanguageModel(GPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=16, context_cache=True))
    calls = []
    module.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    hooked = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert len(calls) == trainer.num_val_batches[0] > 0
    module.model.norm._forward_hooks.clear()  # as if the hook saw nothing: the callback runs the batch again
    module.model.norm.register_forward_hook = lambda *a, **k: type("H", (), {"remove": lambda self: None})()
    again = trainer.validate(module, datamodule=data, verbose=False)[0]
    for name in ("val/loss", "val/cache_loss", "val/cache_bpb", "val/cache_weight"):
        assert again[name] == pytest.approx(hooked[name], rel=1e-5), name
    assert hooked["val/cache_loss"] <= hooked["val/loss"] + 1e-6
