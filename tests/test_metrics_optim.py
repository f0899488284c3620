"""Token-weighted metrics, optimizer parameter groups and the LR schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from lm.metrics import LanguageModelingMetrics
from lm.model import GPT, GPTConfig
from lm.optim import build_optimizer, parameter_groups, warmup_cosine


def test_perplexity_over_unequal_batches_is_token_weighted():
    torch.manual_seed(0)
    vocab = 11
    batches = []
    for n_rows, n_cols, n_ignored in [(4, 7, 0), (1, 3, 0), (2, 5, 4)]:  # unequal sizes, padding in the last
        logits = torch.randn(n_rows, n_cols, vocab) * 3
        targets = torch.randint(0, vocab, (n_rows, n_cols))
        targets.view(-1)[:n_ignored] = -100
        batches.append((logits, targets))

    metric, reference = LanguageModelingMetrics(), Perplexity(ignore_index=-100)
    all_nll, all_count, batch_means = 0.0, 0, []
    for logits, targets in batches:
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count = int((targets != -100).sum())
        metric.update(nll, count, num_bytes=3 * count)
        reference.update(logits, targets)
        all_nll, all_count = all_nll + nll.item(), all_count + count
        batch_means.append(nll.item() / count)

    result = metric.compute()
    expected_loss = all_nll / all_count
    assert result["loss"].item() == pytest.approx(expected_loss, rel=1e-6)
    assert result["ppl"].item() == pytest.approx(math.exp(expected_loss), rel=1e-5)
    assert result["ppl"].item() == pytest.approx(reference.compute().item(), rel=1e-5)
    assert result["bpb"].item() == pytest.approx(all_nll / (math.log(2) * 3 * all_count), rel=1e-6)
    # The naive average of batch means is a different (wrong) number for these batches.
    assert abs(sum(batch_means) / len(batch_means) - expected_loss) > 1e-3


def test_parameter_groups_decay_only_linear_weights():
    model = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, tie_embeddings=True))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.embed_tokens.weight) not in decay_ids  # tied with the head: still an embedding
    assert id(model.layers[0].attn.qkv_proj.weight) in decay_ids
    assert id(model.layers[0].attn.qkv_proj.bias) not in decay_ids
    assert id(model.norm.weight) not in decay_ids
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_parameters()  # every parameter exactly once


def test_fused_adamw_steps():
    model = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          max_position_embeddings=16))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.layers[0].mlp.up_proj.weight)


def test_warmup_cosine_shape():
    warmup, total, floor = 10, 110, 0.1
    lrs = [warmup_cosine(s, warmup, total, floor) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rises
    assert all(a >= b for a, b in zip(lrs[warmup:total], lrs[warmup + 1 : total]))  # then decays
    assert lrs[warmup + 50] == pytest.approx(floor + (1 - floor) * 0.5, rel=1e-6)  # halfway
    assert lrs[total] == pytest.approx(floor) and lrs[-1] == pytest.approx(floor)
