"""The transformer: causality, SDPA == math attention, KV cache == no cache, left padding, init,
parameter count, config errors, and that it can learn. Every property is checked for every variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lm.errors import LMError
from lm.model import GPT, GPTConfig, build_gpt

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", activation="swiglu", num_key_value_heads=2,
                  tie_embeddings=False, bias=False),
    "mqa": dict(num_key_value_heads=1),
    "qk_norm": dict(qk_norm=True),
    "sinusoidal": dict(position="sinusoidal"),
    "dropout_eval": dict(dropout=0.2),
    "rope_mqa_qknorm": dict(position="rope", num_key_value_heads=1, qk_norm=True, norm="rmsnorm"),
    "relu2_softcap_zero_init": dict(activation="relu2", logit_softcap=3.0, zero_init_residual=True),
    "residual_scalars": dict(residual_scalars=True),
}


def make_model(variant: str = "gpt2", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**{**TINY, **VARIANTS[variant], **overrides})).eval()
    if model.config.residual_scalars:  # away from their (identity) start, so the tests see the x0 mix
        with torch.no_grad():
            for i, block in enumerate(model.layers):
                block.residual_scale.fill_(0.8 + 0.1 * i)
                block.embedding_scale.fill_(0.5 - 0.2 * i)
    return model


def twin(model: GPT, **overrides) -> GPT:
    """Same weights, different config values (e.g. attention implementation)."""
    other = build_gpt(GPTConfig(**{**model.config.to_dict(), **overrides})).eval()
    other.load_state_dict(model.state_dict())
    return other


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention_mask and position_ids of a left-padded batch (pad id 0)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


variants = pytest.mark.parametrize("variant", list(VARIANTS))


# ------------------------------------------------------------------------------------ causality
@variants
@torch.no_grad()
def test_future_tokens_never_change_past_logits(variant):
    model = make_model(variant)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    reference = model(ids)
    for t in (0, 7, 18):
        changed = ids.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(19 - t)) % 64
        logits = model(changed)
        torch.testing.assert_close(logits[:, :t + 1], reference[:, :t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])  # the change did reach the future


# ------------------------------------------------------------------------------ SDPA == math
@variants
@torch.no_grad()
def test_sdpa_equals_math_attention(variant):
    sdpa = make_model(variant)
    math_model = twin(sdpa, attention="math")
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(math_model(ids), sdpa(ids), atol=1e-5, rtol=0)
    # left-padded batch: boolean mask path
    ids, mask, positions = left_padded([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])
    out_math = math_model(ids, position_ids=positions, attention_mask=mask)
    out_sdpa = sdpa(ids, position_ids=positions, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out_math[real], out_sdpa[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_in_halves_equals_the_fused_causal_kernel(dtype, monkeypatch):
    """The inference route 384-767 queries take on CPU (`causal_attention_in_halves`) gives each query the keys
    plain causal attention gives it; the rule sends only gradient-free, concrete, cache-free CPU attention there."""
    import lm.model.layers as layers

    q, k, v = torch.randn(3, 2, 3, 512, 16, generator=torch.Generator().manual_seed(0)).to(dtype).unbind(0)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layers.causal_attention_in_halves(q, k, v), fused, atol=tolerance, rtol=0)
    faster = layers.causal_attention_in_halves_is_faster
    assert faster(q, k, needs_grad=False)
    assert not faster(q, k, needs_grad=True)
    assert not faster(q[:, :, :256], k[:, :, :256], needs_grad=False)  # the same speed: the plain call
    assert not faster(q[:, :, -1:], k, needs_grad=False)  # a decode step on a cache
    long_q = torch.randn(1, 2, 1024, 16)
    assert not faster(long_q, long_q, needs_grad=False)  # torch's kernel already uses larger blocks there

    model = make_model("rope_mqa_qknorm", max_position_embeddings=512, num_key_value_heads=4)
    calls, original = [], layers.causal_attention_in_halves
    monkeypatch.setattr(layers, "causal_attention_in_halves", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 64, (2, 400), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        halves = model(ids)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(halves, twin(model, attention="math")(ids), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- KV cache
@variants
@pytest.mark.parametrize("attention", ["sdpa", "math"])
@torch.no_grad()
def test_kv_cache_matches_full_forward(variant, attention):
    model = make_model(variant, attention=attention)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    full = model(ids)

    cache = model.new_kv_cache(2)
    steps = [model(ids[:, :8], kv_cache=cache)]  # prefill
    steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(8, 24)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    assert cache.length == 24

    cache = model.new_kv_cache(2, max_length=24)
    chunks = [model(ids[:, s:s + 5], kv_cache=cache) for s in range(0, 24, 5)]  # chunked prefill
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)


@variants
@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(variant):
    model = make_model(variant)
    rows = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9]]
    continuation = [[7, 9], [3, 2], [3, 8]]  # decoded with the cache after the prompt
    ids, mask, positions = left_padded(rows)
    T = ids.shape[1]

    out = model(ids, position_ids=positions, attention_mask=mask)
    cache = model.new_kv_cache(3)
    prefill = model(ids, kv_cache=cache, position_ids=positions, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(3, 2, dtype=mask.dtype)], dim=1)
    next_pos = positions[:, -1:] + 1
    decoded = []
    for s in range(2):
        tokens = torch.tensor([[c[s]] for c in continuation])
        decoded.append(model(tokens, kv_cache=cache, position_ids=next_pos + s, attention_mask=full_mask[:, :T + s + 1]))
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row + continuation[i]]))[0]
        n = len(row)
        torch.testing.assert_close(out[i, T - n:], alone[:n], atol=1e-4, rtol=0)
        torch.testing.assert_close(prefill[i, T - n:], alone[:n], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cat([d[i] for d in decoded]), alone[n:], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ variants
@torch.no_grad()
def test_rope_base_changes_the_output():
    model = make_model("llama")
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    other = twin(model, rope_base=500.0)
    assert not torch.allclose(model(ids), other(ids), atol=1e-4)


@torch.no_grad()
def test_dropout_active_in_training_and_off_in_eval():
    model = make_model("dropout_eval")
    ids = torch.randint(0, 64, (1, 10))
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_embedding_dropout_drops_whole_token_types_in_training_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, embedding_dropout=0.5))
    ids = torch.arange(64).repeat(4).view(8, 32)  # every type, four times
    model.eval()
    torch.testing.assert_close(model(ids), make_model("gpt2")(ids))  # eval: same as without (same seed, same init)
    model.train()
    with torch.no_grad():
        scale = model._embedding_keep_scale(ids)
    assert set(scale.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    for token in range(64):  # one draw per type: all its occurrences share it
        assert scale[ids == token].unique().numel() == 1
    dropped = (scale.view(-1)[:64] == 0).float().mean().item()  # the first 64 positions: each type once
    assert 0.25 < dropped < 0.75
    logits = model(ids)
    logits.sum().backward()
    assert model.embed_tokens.weight.grad is not None
    with pytest.raises(LMError, match="embedding_dropout"):
        GPTConfig(**TINY, embedding_dropout=1.0)


# --------------------------------------------------------------------------------------- init
def test_init_std_of_residual_projections():
    config = GPTConfig(vocab_size=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=4)
    torch.manual_seed(0)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    for block in model.layers:
        for weight in (block.attn.o_proj.weight, block.mlp.down_proj.weight):
            assert weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.qkv_proj.bias.abs().max().item() == 0.0
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)


@torch.no_grad()
def test_zero_init_residual_blocks_start_as_identity():
    model = make_model("gpt2", zero_init_residual=True)
    for block in model.layers:
        assert block.attn.o_proj.weight.abs().max() == 0 and block.mlp.down_proj.weight.abs().max() == 0
    ids = torch.randint(0, 64, (2, 10))
    x = model.embed_tokens(ids) + model.embed_positions(torch.arange(10))
    torch.testing.assert_close(model(ids), model.lm_head(model.norm(x)))  # every block adds nothing yet


@torch.no_grad()
def test_residual_scalars_start_as_the_plain_model_and_mix_in_the_embedding():
    plain = make_model("gpt2")
    torch.manual_seed(0)
    scaled = GPT(GPTConfig(**TINY, residual_scalars=True)).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)  # same weights; scalars at their start (1, 0)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(scaled(ids), plain(ids))
    block = scaled.layers[1]
    block.residual_scale.fill_(0.5)
    block.embedding_scale.fill_(2.0)
    x, x0 = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    torch.testing.assert_close(block(x, x0=x0), plain.layers[1](0.5 * x + 2.0 * x0))
    assert not torch.allclose(scaled(ids), plain(ids))
    assert {"layers.1.residual_scale", "layers.1.embedding_scale"} <= set(scaled.state_dict())


@torch.no_grad()
def test_relu2_activation_and_logit_softcap():
    plain = make_model("gpt2", activation="relu2")
    h = torch.randn(3, 32)
    mlp = plain.layers[0].mlp
    torch.testing.assert_close(mlp(h), mlp.down_proj(F.relu(mlp.up_proj(h)) ** 2))
    assert not torch.allclose(mlp(h), mlp.down_proj(F.gelu(mlp.up_proj(h), approximate="tanh")))
    with torch.no_grad():  # large logits, so the cap really bites
        plain.embed_tokens.weight.mul_(50)
    capped = twin(plain, logit_softcap=2.0)
    ids = torch.randint(0, 64, (2, 8))
    assert plain(ids).abs().max() > 2.0 and capped(ids).abs().max() <= 2.0
    torch.testing.assert_close(capped(ids), 2.0 * torch.tanh(plain(ids) / 2.0))
    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        GPTConfig(**TINY, logit_softcap=0.0)


def test_tied_and_untied_embeddings():
    tied = make_model("gpt2")
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = make_model("llama")
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() == tied_free_count(untied)


def tied_free_count(model: GPT) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_bias_false_has_no_biases():
    model = make_model("gpt2", bias=False)
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith("bias")]
    assert [n for n, _ in make_model("gpt2").named_parameters() if n.endswith("bias")]


def test_parameter_count_matches_formula():
    V, H, L, P = 100, 48, 3, 40
    model = GPT(GPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=6,
                          max_position_embeddings=P))
    per_layer = (
        2 * (2 * H)              # two LayerNorms, weight + bias
        + H * 3 * H + 3 * H      # fused qkv projection
        + H * H + H              # output projection
        + H * 4 * H + 4 * H      # MLP up
        + 4 * H * H + H          # MLP down
    )
    expected = V * H + P * H + L * per_layer + 2 * H  # tied head counted once; final LayerNorm
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - V * H - P * H

    # LLaMA-style: RMSNorm (weight only), GQA, SwiGLU, untied head, no bias, no position table
    kv, I = 2, 128
    llama = GPT(GPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=6,
                          num_key_value_heads=kv, intermediate_size=I, max_position_embeddings=P, position="rope",
                          norm="rmsnorm", activation="swiglu", tie_embeddings=False, bias=False))
    head_dim = H // 6
    per_layer = 2 * H + H * (6 + 2 * kv) * head_dim + H * H + H * 2 * I + I * H
    assert llama.num_parameters() == 2 * V * H + L * per_layer + H


# ------------------------------------------------------------------------------------- errors
def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="does not divide hidden_size"):
        GPTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GPTConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GPTConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=8)


def test_input_longer_than_context_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------------------------- learning
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).train()
    batch = torch.randint(0, 64, (4, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
