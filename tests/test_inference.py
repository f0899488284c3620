"""CPU decode speed-ups (lm/model/inference.py): every `DecodeLinear` route equals `F.linear`, a prepared
model gives the plain model's logits (with and without the KV cache, every variant), keeps its
Parameters, state-dict keys and ties, stays trainable, drops stale packed weights, and the compiled
decode step equals eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm.model import GPT, GPTConfig, generate
from lm.model import inference
from lm.model.inference import DecodeLinear, onednn_bf16_supported, onednn_fp32_supported, upcast_linear
from tests.test_model import TINY, VARIANTS, make_model, variants

LLAMA = VARIANTS["llama"]

# The keys checkpoints were written with before the decode routes left the model (one layer).
GPT2_KEYS = ["embed_tokens.weight", "embed_positions.embedding.weight", "layers.0.attn_norm.weight",
             "layers.0.attn_norm.bias", "layers.0.attn.qkv_proj.weight", "layers.0.attn.qkv_proj.bias",
             "layers.0.attn.o_proj.weight", "layers.0.attn.o_proj.bias", "layers.0.mlp_norm.weight",
             "layers.0.mlp_norm.bias", "layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.bias",
             "layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.bias", "norm.weight", "norm.bias",
             "lm_head.weight"]
LLAMA_QK_KEYS = ["embed_tokens.weight", "layers.0.attn_norm.weight", "layers.0.attn.qkv_proj.weight",
                 "layers.0.attn.o_proj.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight",
                 "layers.0.mlp_norm.weight", "layers.0.mlp.gate_up_proj.weight", "layers.0.mlp.down_proj.weight",
                 "norm.weight", "lm_head.weight"]


def prepared(variant: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    return make_model(variant, seed, **overrides).to(dtype).prepare_for_inference()


def cached_decode(model: GPT, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then one `decode` step per remaining token."""
    mixture = {"context_cache": True} if getattr(model, "accepts_context_cache", False) else {}  # its mixture
    cache = model.new_kv_cache(ids.shape[0], **mixture)
    steps = [model(ids[:, :prefill], kv_cache=cache, **mixture)]
    steps += [model.decode(ids[:, t:t + 1], kv_cache=cache, **mixture) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


# ------------------------------------------------------------------------------ DecodeLinear
@pytest.mark.parametrize("rows", [1, 2, 5, 17, 40])
def test_decode_linear_routes_equal_f_linear(rows):
    torch.manual_seed(0)
    for bias in (True, False):
        plain = torch.nn.Linear(24, 40, bias=bias)
        layer = DecodeLinear(plain)
        assert layer.weight is plain.weight and layer.bias is plain.bias
        x = torch.randn(rows, 24)
        expected = F.linear(x, plain.weight, plain.bias)
        with torch.inference_mode():  # the decode routes are taken only without autograd
            torch.testing.assert_close(layer(x.view(1, rows, 24)), expected.view(1, rows, 40), atol=1e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not onednn_fp32_supported(), reason="torch has no oneDNN here, or this is not an x86 CPU")
@pytest.mark.parametrize("rows", [1, 17, 40, 600])
def test_packed_fp32_route_equals_f_linear(rows):
    """Prepacked, a layer multiplies more than SMALL_ROWS fp32 rows by the oneDNN copy (and a few as before)."""
    torch.manual_seed(0)
    for bias in (True, False):
        plain = torch.nn.Linear(24, 40, bias=bias)
        layer = DecodeLinear(plain)
        layer.prepack()
        assert layer.has_packed_weight(torch.float32) and not layer.has_packed_weight(torch.bfloat16)
        x = torch.randn(2, rows, 24)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, plain.weight, plain.bias), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_many_bf16_rows_without_onednn_bf16_multiply_in_float32(rows, monkeypatch):
    """Where oneDNN has no bf16 (AVX2) more than SMALL_ROWS bf16 rows are multiplied in float32 and rounded back,
    not by torch's bf16 reference kernel; a few rows keep bf16's own product."""
    monkeypatch.setattr(inference, "onednn_bf16_supported", lambda: False)
    torch.manual_seed(0)
    layer = DecodeLinear(torch.nn.Linear(24, 40).to(torch.bfloat16))
    layer.prepack()
    x = torch.randn(1, rows, 24, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(inference, "upcast_linear", lambda *args: calls.append(1) or upcast_linear(*args))
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and bool(calls) == (rows > DecodeLinear.SMALL_ROWS)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=1e-2)  # bf16 rounding of the output


# ------------------------------------------------------------------------- prepared == plain
@variants
@torch.no_grad()
def test_prepared_model_gives_the_plain_logits(variant):
    plain, fast = make_model(variant), prepared(variant)
    assert not any(isinstance(m, DecodeLinear) for m in plain.modules())
    assert sum(isinstance(m, DecodeLinear) for m in fast.modules()) == 4 * TINY["num_hidden_layers"] + 1
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    full = plain(ids)
    torch.testing.assert_close(fast(ids), full, atol=1e-5, rtol=0)
    for model in (plain, fast):  # KV cache == no cache, one-row steps through the decode routes
        torch.testing.assert_close(cached_decode(model, ids, 6), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached_decode(fast, ids[:1], 6), cached_decode(plain, ids[:1], 6), atol=1e-5, rtol=0)


def test_prepare_keeps_parameters_state_dict_and_ties():
    for variant, keys in (("gpt2", GPT2_KEYS), ("llama", LLAMA_QK_KEYS)):
        overrides = dict(num_hidden_layers=1, qk_norm=variant == "llama")
        plain = make_model(variant, **overrides)
        model = make_model(variant, **overrides)
        parameters = [id(p) for p in model.parameters()]
        assert list(plain.state_dict()) == keys  # a checkpoint written before loads into both
        model.prepare_for_inference().prepare_for_inference()  # idempotent: no layer is wrapped twice
        assert [id(p) for p in model.parameters()] == parameters
        assert list(model.state_dict()) == keys
        assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, DecodeLinear))
        assert (model.lm_head.weight is model.embed_tokens.weight) == (variant == "gpt2")
        model.load_state_dict(plain.state_dict(), strict=True)
        assert model.layers[0].attn.o_proj.is_residual_projection  # attributes carried over


def test_a_prepared_model_still_trains_like_the_plain_one():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    models = {"plain": make_model().train(), "prepared": prepared().train()}
    for model in models.values():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    plain, fast = models["plain"].eval(), models["prepared"].eval()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(cached_decode(fast, ids[:1], 4), cached_decode(plain, ids[:1], 4), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- bf16 packed weights
@pytest.mark.parametrize("overrides", [{}, LLAMA], ids=["gpt2", "llama"])
def test_prepared_bf16_model_matches_unprepared(overrides):
    model = make_model(**overrides).to(torch.bfloat16)
    plain = make_model(**overrides).to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    model.prepare_for_inference()
    packed = [m.current_packed_weight() is not None for m in model.modules() if isinstance(m, DecodeLinear)]
    assert all(packed) if onednn_bf16_supported() else not any(packed)  # AVX2-only CPUs: no oneDNN bf16
    with torch.inference_mode():
        torch.testing.assert_close(cached_decode(model, ids, 4).float(), cached_decode(plain, ids, 4).float(),
                                   atol=2e-2, rtol=0)  # bf16 rounding
    assert (generate(model, [[5, 17, 33]], max_new_tokens=10, temperature=0)
            == generate(plain, [[5, 17, 33]], max_new_tokens=10, temperature=0))


def assert_packed_weight_is_dropped_when_the_weight_changes(model: GPT, rows: int = 1) -> None:
    dtype = model.lm_head.weight.dtype
    x = torch.randn(1, rows, model.config.hidden_size, dtype=dtype)
    for change in ("optimizer step", "load", "move"):
        layer = model.prepare_for_inference().layers[0].mlp.up_proj
        assert layer.current_packed_weight() is not None
        with torch.no_grad():
            if change == "optimizer step":
                layer.weight.add_(1.0)  # in place, as an optimizer does
            elif change == "load":
                model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
            else:
                model.double().to(dtype)
        assert layer.current_packed_weight() is None
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "_packed" not in "".join(model.state_dict())


@pytest.mark.skipif(not onednn_bf16_supported(), reason="this CPU has no oneDNN bf16 (needs AVX-512 bw/vl/dq)")
def test_packed_weights_are_dropped_when_the_weight_changes():
    assert_packed_weight_is_dropped_when_the_weight_changes(make_model().to(torch.bfloat16))


@pytest.mark.skipif(not onednn_fp32_supported(), reason="torch has no oneDNN here, or this is not an x86 CPU")
def test_packed_fp32_weights_are_dropped_when_the_weight_changes():
    assert_packed_weight_is_dropped_when_the_weight_changes(make_model(), rows=DecodeLinear.SMALL_ROWS + 1)


def test_stale_packed_weights_are_never_used_on_any_cpu(monkeypatch):
    """The same bookkeeping where oneDNN has no bf16: a 'packed' weight that is a plain copy, used by
    F.linear, so a stale copy would give the old weight's output."""
    monkeypatch.setattr(inference, "onednn_bf16_supported", lambda: True)
    monkeypatch.setattr(inference, "onednn_pack_weight", lambda weight: weight.clone())
    monkeypatch.setattr(inference, "onednn_linear", F.linear)
    assert_packed_weight_is_dropped_when_the_weight_changes(make_model().to(torch.bfloat16))


# ---------------------------------------------------------------------- compiled decode step
def test_decode_compile_options():
    assert inference.decode_compile_options(torch.device("cpu")) == {"cpp_wrapper": True,
                                                                      "realize_acc_reads_threshold": 1}
    assert inference.decode_compile_options(torch.device("cuda")) == {"cpp_wrapper": True}


@pytest.mark.parametrize("overrides,dtype", [(LLAMA, torch.float32), ({}, torch.float32), ({}, torch.bfloat16),
                                             ({"context_cache": True}, torch.float32)],
                         ids=["llama", "gpt2", "gpt2-bf16", "context-cache"])
def test_compiled_decode_equals_eager(overrides, dtype):
    """prepare_for_inference(compile=True): same logits (1e-4 in fp32) and tokens, batched and padded too.

    bf16: the compiled kernels keep fp32 intermediates that eager rounds to bf16, so only the logits
    are compared, to bf16 rounding (tokens of a random tiny model may flip on near-ties)."""
    model = make_model("gpt2", 1, **overrides).to(dtype).prepare_for_inference(compile=True)
    eager = make_model("gpt2", 1, **overrides).to(dtype)
    for m in (model, eager):
        if getattr(m, "context_cache", None) is not None:  # calibrated, so the decode step really mixes in the copies
            m.context_cache.weight.fill_(0.3), m.context_cache.temperature.fill_(1.1)
    assert model.decode_step is not None and eager.decode_step is None
    ids = torch.tensor([[5, 17, 33, 2, 9, 11]])
    with torch.inference_mode():
        logits = {name: cached_decode(m, ids, 3) for name, m in (("eager", eager), ("compiled", model))}
    if dtype == torch.bfloat16:
        torch.testing.assert_close(logits["compiled"].float(), logits["eager"].float(), atol=3e-2, rtol=0)
        return
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-4, rtol=0)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    assert (generate(model, prompts, max_new_tokens=12, temperature=0)
            == generate(eager, prompts, max_new_tokens=12, temperature=0))
    assert (generate(model, [[4, 5]], max_new_tokens=12, temperature=0)
            == generate(eager, [[4, 5]], max_new_tokens=12, temperature=0, use_cache=False))  # greedy by hand
    assert model.prepare_for_inference().decode_step is None  # compile=False undoes the compiled step


def test_compiled_decode_skips_guards_only_in_the_steady_state(monkeypatch):
    """A 1-token prompt makes the first compiled step see a cache of length 1, which dynamo specializes;
    the guard-free steady state must start only once the generic graph exists, so a long greedy run
    (lengths 1..28, a second batch with padding after it) still equals eager token for token."""
    steady_calls = []
    original = inference.skipping_guards
    monkeypatch.setattr("lm.model.decoder.skipping_guards",
                        lambda steady: steady_calls.append(steady) or original(steady))
    model = make_model("gpt2", 1).prepare_for_inference(compile=True)
    eager = make_model("gpt2", 1)
    for prompts in ([[7]], [[3, 4, 5], [6]]):
        expected = generate(eager, prompts, max_new_tokens=28, temperature=0)
        steady_calls.clear()
        assert generate(model, prompts, max_new_tokens=28, temperature=0) == expected
        assert steady_calls == [False, False] + [True] * 25
    steady_calls.clear()
    generate(eager, [[7]], max_new_tokens=5, temperature=0)
    assert steady_calls == [False] * 4  # an uncompiled model never skips guards
