"""`lm export --format gguf` (lm/export/gguf.py): the file read back with gguf's own reader, its metadata,
tensor names, shapes and values, and the logits of llama.cpp's graphs (llama, gpt2) written out here in torch
from the file alone: a wrong RoPE row order, orientation or name would change them. The slow test at the
end runs llama.cpp itself when llama-cpp-python is installed (benchmarks/gguf_llamacpp.py is the full check)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.commands.export import export
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.export.folder import MANIFEST
from lm.export.gguf import FILE_NAME, export_gguf, gguf_architecture, rope_pairs_layout
from lm.io.checkpoints import save_model
from lm.model import GPT, GPTConfig, build_gpt
from lm.model.layers import apply_rotary, RotaryPositions
from tests.conftest import make_corpus

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False,
             num_key_value_heads=2, rope_base=500.0)  # experiments/variants/llama.yaml (a base that shows in 32 positions)
GPT2 = dict(position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([make_corpus(20)], vocab_size=300)


def model_of(tokenizer: Tokenizer, extra_rows: int = 5, seed: int = 0, **variant) -> GPT:
    """A model with trained-looking weights (norm gains and biases away from 1 and 0) and a few embedding rows
    more than the tokenizer has tokens, as a tokenizer trained on a small text leaves."""
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(vocab_size=tokenizer.vocab_size + extra_rows, **{**BASE, **variant})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else p.mul_(3.0)
    return model


def read(folder) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata, {tensor name: float32 array in numpy (out, in) order}, {tensor name: GGML type name})."""
    reader = gguf.GGUFReader(folder / FILE_NAME)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arrays = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
              for t in reader.tensors}
    return fields, arrays, {t.name: t.tensor_type.name for t in reader.tensors}


# ------------------------------------------------------------- llama.cpp's graphs, from the file alone
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_adjacent_pairs(x, base):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: channels (2i, 2i+1) rotated by pos * base^(-2i/d). x: (heads, T, d)."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[1])[:, None] * base ** (-torch.arange(0, d, 2) / d)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _attend(q, k, v, heads, kv_heads):
    T, d = q.shape[0], q.shape[1] // heads
    q, k, v = (t.reshape(T, n, d).transpose(0, 1) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    return q, k, v


def _softmax_attention(q, k, v, heads, kv_heads):
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).flatten(1)


def llama_cpp_logits(fields: dict, t: dict[str, np.ndarray], ids: list[int]) -> torch.Tensor:
    """What llama.cpp's `llama` (src/models/llama.cpp) or `gpt2` (src/models/gpt2.cpp) graph computes."""
    arch = fields["general.architecture"]
    W = {name: torch.tensor(a) for name, a in t.items()}
    heads, kv_heads = fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]
    x = W["token_embd.weight"][ids]
    if arch == "gpt2":
        eps = fields["gpt2.attention.layer_norm_epsilon"]
        norm = lambda h, n: F.layer_norm(h, h.shape[-1:], W[f"{n}.weight"], W[f"{n}.bias"], eps)  # noqa: E731
        x = x + W["position_embd.weight"][: len(ids)]
    else:
        eps = fields["llama.attention.layer_norm_rms_epsilon"]
        norm = lambda h, n: _rms(h, W[f"{n}.weight"], eps)  # noqa: E731
    for i in range(fields[f"{arch}.block_count"]):
        b = f"blk.{i}."
        h = norm(x, f"{b}attn_norm")
        if arch == "gpt2":
            qkv = h @ W[f"{b}attn_qkv.weight"].T + W[f"{b}attn_qkv.bias"]
            kv = qkv.shape[1] - h.shape[1]
            q, k, v = _attend(*qkv.split([h.shape[1], kv // 2, kv // 2], dim=1), heads, kv_heads)
        else:
            q, k, v = _attend(*(h @ W[f"{b}attn_{n}.weight"].T for n in "qkv"), heads, kv_heads)
            base = fields["llama.rope.freq_base"]
            q, k = _rope_adjacent_pairs(q, base), _rope_adjacent_pairs(k, base)
        x = x + _softmax_attention(q, k, v, heads, kv_heads) @ W[f"{b}attn_output.weight"].T
        x = x + W.get(f"{b}attn_output.bias", 0)
        h = norm(x, f"{b}ffn_norm")
        if arch == "gpt2":
            h = F.gelu(h @ W[f"{b}ffn_up.weight"].T + W[f"{b}ffn_up.bias"], approximate="tanh")
            x = x + h @ W[f"{b}ffn_down.weight"].T + W[f"{b}ffn_down.bias"]
        else:
            x = x + (F.silu(h @ W[f"{b}ffn_gate.weight"].T) * (h @ W[f"{b}ffn_up.weight"].T)) @ W[f"{b}ffn_down.weight"].T
    return norm(x, "output_norm") @ W.get("output.weight", W["token_embd.weight"]).T


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("variant,arch", [(LLAMA, "llama"), (GPT2, "gpt2")], ids=["llama", "gpt2"])
def test_f32_file_computes_the_models_logits_in_llama_cpps_graph(tokenizer, tmp_path, variant, arch):
    model = model_of(tokenizer, **variant)
    export_gguf(model, tokenizer, tmp_path / "g", gguf_type="f32")
    fields, tensors, types = read(tmp_path / "g")
    c = model.config
    assert fields["general.architecture"] == arch and fields["general.file_type"] == 0
    expected = {"context_length": 32, "embedding_length": 64, "block_count": 2, "feed_forward_length": c.intermediate_size,
                "attention.head_count": 4, "attention.head_count_kv": c.num_key_value_heads}
    assert {k: fields[f"{arch}.{k}"] for k in expected} == expected
    if arch == "llama":
        assert fields["llama.rope.freq_base"] == 500.0 and fields["llama.rope.dimension_count"] == 16
    assert set(types.values()) == {"F32"}
    ids = tokenizer.encode(make_corpus(1, seed=5))[:32]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        theirs = llama_cpp_logits(fields, tensors, ids)
    assert ours.abs().max() > 1.0  # logits with a spread, not all near zero
    assert (theirs - ours).abs().max() < 1e-4


def test_tensor_names_and_shapes_are_llama_cpps(tokenizer, tmp_path):
    """Every name is one llama.cpp's architecture declares (gguf.MODEL_TENSORS), every weight (out, in) as ours."""
    for variant, arch in ((LLAMA, gguf.MODEL_ARCH.LLAMA), (GPT2, gguf.MODEL_ARCH.GPT2)):
        model = model_of(tokenizer, **variant)
        folder = export_gguf(model, tokenizer, tmp_path / arch.name, gguf_type="f32")
        _, tensors, _ = read(folder)
        known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(2)}
        assert {name.rsplit(".", 1)[0] for name in tensors} <= known, set(tensors)
        assert tensors["token_embd.weight"].shape == (model.config.vocab_size, 64)
        assert tensors["blk.1.ffn_down.weight"].shape == (64, model.config.intermediate_size)
        assert ("output.weight" in tensors) == (not model.config.tie_embeddings)  # tied: llama.cpp reads token_embd
    assert tensors["blk.0.attn_qkv.weight"].shape == (3 * 64, 64)  # gpt2: our fused projection as it is


def test_llama_query_and_key_rows_are_in_llama_cpps_rope_order(tokenizer, tmp_path):
    """lm rotates the two halves of a head (rotate-half); llama.cpp adjacent pairs. The file holds the rows
    reordered so that llama.cpp's rotation of them is lm's rotation, reordered the same way."""
    model = model_of(tokenizer, **LLAMA)
    _, tensors, _ = read(export_gguf(model, tokenizer, tmp_path / "g", gguf_type="f32"))
    q, k, v = model.layers[1].attn.qkv_proj.weight.detach().split([64, 32, 32])
    assert np.array_equal(tensors["blk.1.attn_q.weight"], rope_pairs_layout(q, 4).numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight"], rope_pairs_layout(k, 2).numpy())
    assert np.array_equal(tensors["blk.1.attn_v.weight"], v.numpy())  # values are not rotated
    x = torch.randn(1, 3, 32, 16)  # (batch, heads, positions, head_dim)
    lm_rotated = apply_rotary(x, *RotaryPositions(model.config)(torch.arange(32)))
    as_rows = lambda t: rope_pairs_layout(t.squeeze(0).permute(2, 0, 1), 1).permute(1, 2, 0)  # noqa: E731
    assert torch.allclose(_rope_adjacent_pairs(as_rows(x), 500.0), as_rows(lm_rotated), atol=1e-5)


def test_gpt2_without_biases_gets_the_zero_biases_llama_cpp_requires(tokenizer, tmp_path):
    model = model_of(tokenizer, **{**GPT2, "bias": False})
    fields, tensors, _ = read(export_gguf(model, tokenizer, tmp_path / "g", gguf_type="f32"))
    assert not np.any(tensors["blk.0.attn_qkv.bias"]) and not np.any(tensors["output_norm.bias"])
    ids = tokenizer.encode(make_corpus(1, seed=3))[:20]
    with torch.no_grad():
        assert (llama_cpp_logits(fields, tensors, ids) - model(torch.tensor([ids]))[0]).abs().max() < 1e-4


def test_tokenizer_is_llama_cpps_byte_level_bpe(tokenizer, tmp_path):
    model = model_of(tokenizer, **LLAMA)
    fields, _, _ = read(export_gguf(model, tokenizer, tmp_path / "g"))
    spec = json.loads(tokenizer.to_str())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == model.config.vocab_size == tokenizer.vocab_size + 5
    vocab = {token: i for i, token in enumerate(tokens)}
    assert all(vocab[token] == i for token, i in spec["model"]["vocab"].items())
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(tokenizer.vocab_size, tokenizer.vocab_size + 5)]
    eot = tokenizer.eot_id
    assert tokens[eot] == "<|endoftext|>" and types[eot] == gguf.TokenType.CONTROL
    assert set(types[-5:]) == {gguf.TokenType.UNUSED} and types[eot + 1] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_q8_0_and_f16_quantize_the_matrices_and_keep_norms_in_f32(tokenizer, tmp_path):
    model = model_of(tokenizer, **LLAMA)
    _, exact, _ = read(export_gguf(model, tokenizer, tmp_path / "f32", gguf_type="f32"))
    ids = tokenizer.encode(make_corpus(1, seed=5))[:32]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    sizes = {"f32": (tmp_path / "f32" / FILE_NAME).stat().st_size}
    for gguf_type, matrix_type in (("f16", "F16"), ("q8_0", "Q8_0")):
        fields, tensors, types = read(export_gguf(model, tokenizer, tmp_path / gguf_type, gguf_type=gguf_type))
        sizes[gguf_type] = (tmp_path / gguf_type / FILE_NAME).stat().st_size
        assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[gguf_type]
        assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
        assert {types[n] for n in types if not n.endswith("_norm.weight")} == {matrix_type}
        for name, array in tensors.items():
            original = exact[name]
            if gguf_type == "q8_0" and array.ndim == 2:  # blocks of 32 along a row, step d = max |x| / 127
                blocks = original.reshape(-1, 32)  # half a step, plus up to 127 x the f16 rounding of d (2^-11 d)
                bound = np.abs(blocks).max(1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
                assert np.all(np.abs(array.reshape(-1, 32) - blocks) <= bound), name
            else:
                assert np.allclose(array, original, rtol=1e-3, atol=1e-6), name
        theirs = llama_cpp_logits(fields, tensors, ids)
        assert (theirs - ours).abs().max() < {"f16": 0.01, "q8_0": 0.1}[gguf_type] * ours.abs().max()
    assert sizes["q8_0"] < sizes["f16"] < 0.6 * sizes["f32"]


@pytest.mark.parametrize("overrides,feature", [
    ({**LLAMA, "qk_norm": True}, "qk_norm=True"),
    ({**LLAMA, "residual_scalars": True}, "residual_scalars=True"),
    ({**LLAMA, "logit_softcap": 30.0}, "logit_softcap=30.0"),
    ({**GPT2, "activation": "relu2"}, "activation='relu2'"),
    ({**GPT2, "position": "sinusoidal"}, "position='sinusoidal'"),
    ({**GPT2, "num_key_value_heads": 2}, "num_key_value_heads=2"),
], ids=["qk_norm", "residual_scalars", "logit_softcap", "relu2", "sinusoidal", "gpt2_gqa"])
def test_variants_llama_cpp_cannot_run_are_refused_naming_the_feature(tokenizer, tmp_path, overrides, feature):
    with pytest.raises(LMError, match=f"differs in {feature}") as error:
        export_gguf(model_of(tokenizer, **overrides), tokenizer, tmp_path / "g")
    assert "\n" not in str(error.value) and not (tmp_path / "g").exists()
    assert gguf_architecture(GPTConfig(vocab_size=300, **{**BASE, **LLAMA})) == "llama"


def test_a_tokenizer_llama_cpp_has_no_counterpart_for_is_refused(tmp_path):
    unigram = Tokenizer.train([make_corpus(20)], vocab_size=300, kind="unigram")
    with pytest.raises(LMError, match="byte-level BPE"):
        export_gguf(model_of(unigram, **LLAMA), unigram, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_lm_export_writes_the_plain_softmax_of_a_model_with_a_context_cache(tokenizer, tmp_path, capsys):
    model = model_of(tokenizer, **{**LLAMA, "context_cache": True})
    ckpt = save_model(tmp_path / "m.ckpt", model, tokenizer)
    export(ckpt_path=str(ckpt), output=str(tmp_path / "g"), format="gguf", gguf_type="q8_0")
    assert "not exported" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [MANIFEST, FILE_NAME]
    fields, tensors, _ = read(tmp_path / "g")
    ids = tokenizer.encode(make_corpus(1, seed=5))[:32]
    with torch.no_grad():
        plain = model(torch.tensor([ids]), context_cache=False)[0]
    assert fields["general.file_type"] == 7
    assert (llama_cpp_logits(fields, tensors, ids) - plain).abs().max() < 0.1 * plain.abs().max()
    with pytest.raises(LMError, match="cannot be exported to GGUF"):
        export(ckpt_path=str(ckpt), output=str(tmp_path / "g2"), format="gguf", context_cache=True)
    with pytest.raises(LMError, match="--gguf_type is for --format gguf"):
        export(ckpt_path=str(ckpt), output=str(tmp_path / "g3"), format="safetensors", gguf_type="q8_0")
    export(ckpt_path=str(ckpt), output=str(tmp_path / "g"), format="gguf", overwrite=True)  # replaces its own export
    assert read(tmp_path / "g")[0]["general.file_type"] == 1  # the default: f16


def test_without_the_gguf_package_the_export_names_the_extra(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(LMError, match=r"lm export --format gguf needs the gguf extra .*pip install 'lm\[gguf\]'"):
        export_gguf(model_of(tokenizer, **LLAMA), tokenizer, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_llama_cpp_loads_the_file_and_computes_the_same_logits(tokenizer, tmp_path):
    """llama.cpp itself (llama-cpp-python, not a test dependency: its build takes minutes)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmarks/gguf_llamacpp.py)")
    for variant in (LLAMA, GPT2):
        model = model_of(tokenizer, **variant)
        folder = export_gguf(model, tokenizer, tmp_path / variant["position"], gguf_type="f32")
        llm = llama_cpp.Llama(model_path=str(folder / FILE_NAME), n_ctx=32, logits_all=True, type_k=0, type_v=0,
                              n_threads=2, verbose=False)
        text = make_corpus(1, seed=5)[:80]
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:32]
        assert ids == tokenizer.encode(text)[:32]
        llm.eval(ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(np.array(llm.scores[: len(ids)]) - ours).max()
        assert diff < 0.01 * np.abs(ours).max(), diff  # gpt2's GELU goes through ggml's f16 table
