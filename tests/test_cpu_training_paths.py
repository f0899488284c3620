"""The CPU training step's own paths, each against what it replaces: `lm.model.layers.Dropout`'s masks from 16-bit
lanes (against `nn.Dropout`), `SummedCrossEntropy` and `SoftTargetCrossEntropy` (against `F.cross_entropy`), and the
written-out attention that bf16 training takes on CPU (against torch's fused kernel)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lm.evaluation.token_losses import IGNORE_INDEX, SoftTargetCrossEntropy, SummedCrossEntropy, token_nll
from lm.model import GPT, GPTConfig
from lm.model.layers import (WRITTEN_OUT_ATTENTION_MAX_SCORES, CausalSelfAttention, Dropout,
                             written_out_attention_is_faster)


# ------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_1_minus_p_and_is_unbiased(p, dtype):
    torch.manual_seed(0)
    dropout = Dropout(p).train()
    out = dropout(torch.ones(1000, 1000, dtype=dtype))
    kept = (out != 0).double().mean().item()
    # A million Bernoulli draws: the kept fraction is within 5 standard deviations of 1 - p (~0.002).
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / 1e6)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p), rel=4e-3)
    assert out.double().mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(p / (1 - p) / 1e6))


def test_dropout_lanes_are_independent_and_every_lane_is_used():
    """Each 64-bit draw feeds four elements: element i and i + 1 (lanes of one draw) are not correlated, and
    each lane position keeps 1 - p (the top lane too: a draw of torch's default range would leave its sign bit 0)."""
    torch.manual_seed(1)
    kept = (Dropout(0.5).train()(torch.ones(400_000)) != 0).double()
    for lane in range(4):
        assert kept[lane::4].mean().item() == pytest.approx(0.5, abs=0.005)
    pairs = kept.view(-1, 4)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert (pairs[:, a] * pairs[:, b]).mean().item() == pytest.approx(0.25, abs=0.005)


def test_dropout_is_seeded_like_nn_dropout_and_passes_through_in_eval_and_at_zero():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    first = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.3).train()(x), first)
    assert not torch.equal(Dropout(0.3).train()(x), first)  # the generator moved on: new masks
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert isinstance(Dropout(0.1), nn.Dropout) and Dropout(0.1).state_dict() == {}


def test_dropout_gradient_is_its_mask():
    torch.manual_seed(4)
    x = torch.randn(50, 40, requires_grad=True)
    out = Dropout(0.25).train()(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(out != 0, 1 / 0.75, 0.0), rtol=1e-4, atol=0)


# -------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, SummedCrossEntropy.ROWS, 3 * SummedCrossEntropy.ROWS + 5])
def test_summed_cross_entropy_equals_f_cross_entropy(dtype, rows):
    torch.manual_seed(rows)
    logits = (3 * torch.randn(rows, 300)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (rows,))
    targets[::3] = IGNORE_INDEX
    nll = SummedCrossEntropy.apply(logits, targets)
    nll.backward(torch.tensor(0.7))
    ours = logits.grad.clone()
    logits.grad = None
    reference = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (0.7 * reference).backward()
    torch.testing.assert_close(nll, reference, rtol=1e-6, atol=1e-4)
    assert ours.dtype == dtype
    # fp32: to rounding; bf16: both are the fp32 gradient rounded once to bf16.
    torch.testing.assert_close(ours, logits.grad, rtol=0 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, SoftTargetCrossEntropy.ROWS + 9])
def test_soft_target_cross_entropy_equals_f_cross_entropy_of_the_dense_targets(dtype, rows):
    torch.manual_seed(rows)
    vocab, pairs = 50, 6
    logits = (3 * torch.randn(rows, vocab)).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (rows, pairs))
    ids[:, 1] = ids[:, 0]  # a repeated id: its weights add up
    weights = torch.rand(rows, pairs)
    weights[::2, 3:] = 0  # unused pairs
    loss = SoftTargetCrossEntropy.apply(logits, ids, weights)
    loss.backward(torch.tensor(0.7))
    ours = logits.grad.clone()
    logits.grad = None
    dense = torch.zeros(rows, vocab).scatter_add_(1, ids, weights)  # unnormalized soft targets
    reference = F.cross_entropy(logits.float(), dense / dense.sum(1, keepdim=True), reduction="none") @ dense.sum(1)
    (0.7 * reference).backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-4)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, logits.grad, rtol=0 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_token_nll_takes_it_only_where_a_gradient_is_wanted_on_cpu():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    nll, count = token_nll(logits, targets)
    assert nll.grad_fn is not None and type(nll.grad_fn).__name__ == "SummedCrossEntropyBackward"
    assert count.item() == 10
    with torch.no_grad():
        plain, _ = token_nll(logits, targets)
    torch.testing.assert_close(plain, nll.detach())
    all_ignored = torch.full((2, 5), IGNORE_INDEX)
    nll, count = token_nll(logits, all_ignored)
    nll.backward()
    assert nll.item() == 0 and count.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------ attention
def test_written_out_attention_rule():
    small = WRITTEN_OUT_ATTENTION_MAX_SCORES
    assert written_out_attention_is_faster("cpu", torch.bfloat16, small, needs_grad=True)
    assert not written_out_attention_is_faster("cpu", torch.bfloat16, small + 1, needs_grad=True)  # memory
    assert not written_out_attention_is_faster("cpu", torch.float32, 16, needs_grad=True)  # fused is as fast
    assert not written_out_attention_is_faster("cpu", torch.bfloat16, 16, needs_grad=False)  # forward only
    assert not written_out_attention_is_faster("cuda", torch.bfloat16, 16, needs_grad=True)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_bf16_training_attention_written_out_gives_the_fused_kernels_values(kv_heads, monkeypatch):
    import lm.model.layers as layers

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=kv_heads, max_position_embeddings=16, position="rope", qk_norm=True,
                       dropout=0.0, attention_dropout=0.0)
    attention = CausalSelfAttention(config).train()
    rotary = GPT(config).rotary(torch.arange(16))
    x = torch.randn(3, 16, 32, requires_grad=True)
    original, calls = layers.math_attention, []
    monkeypatch.setattr(layers, "math_attention", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run():
        x.grad = None
        attention.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(x, rotary)
        out.float().sum().backward()
        return out.float(), x.grad.clone(), attention.qkv_proj.weight.grad.clone()

    written = run()  # the rule itself: bf16, CPU, a gradient, 3 x 4 x 16 x 16 scores
    assert calls
    calls.clear()
    monkeypatch.setattr(layers, "written_out_attention_is_faster", lambda *a: False)
    fused = run()
    assert not calls
    for a, b in zip(written, fused):  # bf16 products summed in another order: ~1% apart, as a whole
        assert ((a - b).norm() / b.norm()).item() < 2e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # forward only: the fused kernel
        monkeypatch.setattr(layers, "written_out_attention_is_faster", original_rule)
        attention(x, rotary)
    assert not calls


original_rule = written_out_attention_is_faster
