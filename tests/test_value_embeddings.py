"""`GPTConfig.value_embeddings` (the modded-nanoGPT speedruns' value embeddings) in every verb: the model (tables
shared U-net style, KV-cache decoding, embedding dropout, activation checkpointing, gradients), the optimizer's
parameter groups, `lm plan`'s counts, `--model.init_from`, the fast decode paths, int8 quantization, pruning, the
exports that refuse it (GGUF, native transformers classes) or carry it (ONNX), and `lm fit` + `lm generate`.
The Hugging Face folder's logits (lm's own code): tests/test_export_hf.py (`SINGLE_OPTIONS`)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lm.cli.main import main
from lm.compress.prune import prune_mlp_channels
from lm.compress.quantize import Int8Linear, quantize_model
from lm.errors import LMError
from lm.export.gguf import gguf_architecture
from lm.export.hf import hf_architecture
from lm.io.checkpoints import load_model, read_checkpoint
from lm.model import GPT, GPTConfig, build_gpt, generate
from lm.modules.init_from import config_differences
from lm.modules.optimizers import MuonWithAdamW, build_optimizer, parameter_groups
from lm.plan.estimate import PRECISIONS, activation_bytes_per_token
from lm.plan.recipe import ModelShape, read_recipe, value_embedding_rows
from tests.conftest import write_corpus_files
from tests.helpers import (REPO_ROOT, TINY_MODEL, TINY_TRAINER, assert_lm_generate_matches, assert_onnx_matches,
                           saved_bytes, tiny_data)

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=32)
ROPE_GQA = dict(position="rope", num_key_value_heads=2, qk_norm=True)
LLAMA = dict(norm="rmsnorm", position="rope", activation="swiglu", bias=False)


def tiny(n: int, seed: int = 0, **fields) -> GPT:
    """A GPT with `n` value-embedding tables whose scales are moved off their start (1), each layer differently."""
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**{**TINY, **fields, "value_embeddings": n})).eval()
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            if hasattr(block.attn, "value_embedding_scale"):
                block.attn.value_embedding_scale.fill_(0.7 + 0.2 * i)
    return model


def token_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rows_each_layer_gets(model: GPT, input_ids: torch.Tensor) -> list:
    """The `value_embedding` each attention layer is called with (None where it gets none)."""
    seen = [None] * len(model.layers)
    hooks = [block.attn.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.__setitem__(i, kwargs.get("value_embedding")), with_kwargs=True)
        for i, block in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("n,expected", [
    (0, [(), (), (), ()]), (1, [(0,), (), (), (0,)]), (2, [(0,), (1,), (0,), (1,)]),
    (3, [(0,), (1, 0), (2, 1), (2,)]), (4, [(0,), (1,), (2,), (3,)]),
])
def test_table_j_serves_layer_j_and_layer_L_minus_n_plus_j(n, expected):
    config = GPTConfig(**TINY, value_embeddings=n)
    assert [config.value_embedding_tables(i) for i in range(4)] == expected


@pytest.mark.parametrize("n", [-1, 5])
def test_a_number_of_tables_outside_0_to_the_layers_is_refused_in_one_line(n):
    with pytest.raises(LMError, match=f"value_embeddings must be between 0 .* got {n}") as error:
        GPTConfig(**TINY, value_embeddings=n)
    assert "\n" not in str(error.value)
    with pytest.raises(LMError, match="value_embeddings"):
        GPTConfig.from_dict({**TINY, "value_embeddings": n})


# ------------------------------------------------------------------------------------------------ model
def test_off_is_the_plain_model_and_zero_tables_change_nothing():
    plain = tiny(0)
    assert not [k for k in plain.state_dict() if "value_embedding" in k]
    assert set(plain.state_dict()) == set(GPT(GPTConfig(**TINY)).state_dict())
    with_tables = tiny(2)
    extra = set(with_tables.state_dict()) - set(plain.state_dict())
    assert extra == {"value_embeddings.0.weight", "value_embeddings.1.weight",
                     *(f"layers.{i}.attn.value_embedding_scale" for i in range(4))}
    assert with_tables.value_embeddings[0].weight.shape == (VOCAB, 32)  # vocab x kv heads x head size
    # Made aside: at the same seed every other weight is the plain model's (a screen compares like with like) ...
    assert all(torch.equal(tensor, with_tables.state_dict()[name]) for name, tensor in plain.state_dict().items())
    assert with_tables.value_embeddings[0].weight.std().item() == pytest.approx(0.02, rel=0.1)  # N(0, init_std)
    draws = []
    for n in (0, 2):  # and what the run draws next is unchanged too
        torch.manual_seed(0)
        GPT(GPTConfig(**TINY, value_embeddings=n))
        draws.append(torch.rand(3))
    assert torch.equal(*draws)
    # ... and with all-zero tables the logits are exactly the plain model's (the tables only add to v).
    with torch.no_grad():
        for table in with_tables.value_embeddings:
            table.weight.zero_()
        x = token_ids()
        assert torch.equal(with_tables(x), plain(x))
        assert with_tables(x).shape == (2, 12, VOCAB)
        with_tables.value_embeddings[1].weight.normal_()  # and non-zero tables do change them
        assert (with_tables(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize("n", [1, 3, 4])
def test_layer_j_and_layer_L_minus_n_plus_j_read_the_same_table(n):
    model = tiny(n, **ROPE_GQA)
    x = token_ids()
    seen = rows_each_layer_gets(model, x)
    L = len(model.layers)
    for i, rows in enumerate(seen):
        tables = model.config.value_embedding_tables(i)
        if not tables:
            assert rows is None and not hasattr(model.layers[i].attn, "value_embedding_scale")
            continue
        expected = sum(model.value_embeddings[j].weight[x] for j in tables)
        assert rows.shape == (2, 12, 16) and torch.allclose(rows, expected)  # kv_size = 2 heads x 8
    for j in range(n):
        if len(model.config.value_embedding_tables(j)) == 1 and len(model.config.value_embedding_tables(L - n + j)) == 1:
            assert seen[j] is seen[L - n + j]  # one lookup of the one table, handed to both layers


def test_future_tokens_never_change_past_logits():
    model = tiny(3, **ROPE_GQA)
    x = token_ids()
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :7], model(changed)[:, :7], atol=1e-6)


@pytest.mark.parametrize("fields", [{}, ROPE_GQA, dict(ROPE_GQA, attention="math", num_key_value_heads=1)],
                         ids=["gpt2", "rope_gqa_qknorm", "math_mqa"])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_kv_cache_decoding_equals_the_full_forward(n, fields):
    model = tiny(n, **fields)
    x = token_ids(length=16)
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2)
        steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(5, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    # Greedy generation with the cache = without it (every step a full forward).
    prompt = x[:, :4]
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=0, repetition_penalty=1.0),
                       generate(model, prompt, max_new_tokens=10, temperature=0, repetition_penalty=1.0,
                                use_cache=False))


def test_gradients_reach_the_used_table_rows_and_the_scales():
    model = tiny(3).train()
    x = token_ids()
    model(x).logsumexp(-1).mean().backward()
    used = torch.zeros(VOCAB, dtype=torch.bool)
    used[x.flatten()] = True
    for table in model.value_embeddings:
        row_norms = table.weight.grad.norm(dim=1)
        assert (row_norms[used] > 0).all() and (row_norms[~used] == 0).all()
    for block in model.layers:
        assert block.attn.value_embedding_scale.grad.abs() > 0


def test_embedding_dropout_drops_the_same_token_types_from_the_value_tables():
    model = tiny(2, embedding_dropout=0.5).train()
    x = token_ids(length=16)
    scales = []
    original = model._embedding_keep_scale
    model._embedding_keep_scale = lambda ids: scales.append(original(ids)) or scales[-1]
    torch.manual_seed(3)
    seen = rows_each_layer_gets(model, x)
    (scale,) = scales
    assert (scale == 0).any() and (scale > 0).any()
    expected = model.value_embeddings[0].weight[x] * scale
    assert torch.allclose(seen[0], expected)
    assert (seen[0][scale[..., 0] == 0] == 0).all()  # a dropped type reads zero from the table too
    model.eval()
    assert torch.allclose(rows_each_layer_gets(model, x)[0], model.value_embeddings[0].weight[x])  # eval: no drop


def test_activation_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict:
        model = tiny(3, dropout=0.1, embedding_dropout=0.1, **ROPE_GQA).train()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(5)
        model(token_ids()).logsumexp(-1).mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6), name


def test_bf16_mixed_training_and_bf16_decoding():
    """Under autocast the table rows are fp32 and v is bf16: the sum is attended to in v's dtype (SDPA refuses
    mixed dtypes), and a bf16 model's cached decode follows its full forward."""
    model = tiny(3, **ROPE_GQA).train()
    x = token_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    assert model.value_embeddings[0].weight.grad.dtype == torch.float32
    model = model.eval().to(torch.bfloat16)
    with torch.no_grad():
        full = model(x).float()
        cache = model.new_kv_cache(2)
        steps = [model(x[:, :6], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(6, 12)]
    assert (torch.cat(steps, dim=1).float() - full).abs().max() < 0.05 * full.abs().max()


def test_prepared_for_inference_decodes_the_same_logits():
    model = tiny(3, **ROPE_GQA)
    reference = copy.deepcopy(model)
    model.prepare_for_inference()
    x = token_ids(length=10)
    with torch.no_grad():
        cache = model.new_kv_cache(2)
        steps = [model.decode(x[:, :4], cache)] + [model.decode(x[:, t:t + 1], cache) for t in range(4, 10)]
        assert (torch.cat(steps, dim=1) - reference(x)).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decode_step_decodes_the_same_logits():
    model = tiny(3, **ROPE_GQA)
    reference = copy.deepcopy(model)
    model.prepare_for_inference(compile=True)
    x = token_ids(batch=1, length=8)
    with torch.no_grad():
        cache = model.new_kv_cache(1)
        steps = [model(x[:, :4], kv_cache=cache)] + [model.decode(x[:, t:t + 1], cache) for t in range(4, 8)]
        assert (torch.cat(steps, dim=1) - reference(x)).abs().max() < 1e-4


def test_parameter_counts_include_the_tables_and_exclude_them_as_embeddings():
    plain, model = tiny(0), tiny(3)
    tables = 3 * VOCAB * 32
    assert model.num_parameters() == plain.num_parameters() + tables + 4  # + one scale per served layer
    assert model.num_parameters(exclude_embeddings=True) == plain.num_parameters(exclude_embeddings=True) + 4
    assert model.flops_per_token() == plain.flops_per_token()  # lookups, no matmul


# ------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_tables_and_scales_go_to_adamw_without_weight_decay(optimizer):
    model = tiny(2, **LLAMA)
    tables = {id(t.weight) for t in model.value_embeddings}
    scales = {id(b.attn.value_embedding_scale) for b in model.layers}
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert tables | scales <= {id(p) for p in no_decay["params"]}
    assert not (tables | scales) & {id(p) for p in decay["params"]}
    built = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), optimizer=optimizer)
    adamw = built.adamw if isinstance(built, MuonWithAdamW) else built
    in_adamw = {id(p): group["weight_decay"] for group in adamw.param_groups for p in group["params"]}
    assert all(in_adamw.get(i) == 0.0 for i in tables | scales)
    if isinstance(built, MuonWithAdamW):
        in_muon = {id(p) for group in built.muon.param_groups for p in group["params"]}
        assert in_muon and not (tables | scales) & in_muon
        assert id(model.layers[0].attn.qkv_proj.weight) in in_muon  # the hidden matrices still go to Muon


# ----------------------------------------------------------------------------------------------- lm plan
@pytest.mark.parametrize("n,layers", [(1, 3), (2, 3), (3, 3)])  # 2 of 3: the middle layer sums two tables
def test_plan_activation_formula_counts_the_value_embedding_rows(n, layers):
    config = GPTConfig(**{**TINY, "num_hidden_layers": layers, "value_embeddings": n, **ROPE_GQA})
    model = GPT(config).train()
    c = model.config
    shape = ModelShape(parameters=0, non_embedding_parameters=0, flops_per_token=0, sequence_length=32,
                       vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=4,
                       kv_size=c.num_key_value_heads * c.head_dim, intermediate_size=c.intermediate_size,
                       activation=c.activation, attention=c.attention, position=c.position, qk_norm=c.qk_norm,
                       dropout=c.dropout, largest_unit_parameters=0, value_embedding_rows=value_embedding_rows(c),
                       value_embedding_layers=sum(bool(c.value_embedding_tables(i)) for i in range(layers)))
    assert shape.value_embedding_rows == n + (n == 2) and shape.value_embedding_layers == (2 if n == 1 else 3)
    plain = dataclasses.replace(shape, value_embedding_rows=0, value_embedding_layers=0)
    x = token_ids(batch=4, length=32)
    measured, _ = saved_bytes(model, x)
    measured_plain, _ = saved_bytes(GPT(dataclasses.replace(config, value_embeddings=0)).train(), x)
    planned, planned_plain = (4 * 32 * activation_bytes_per_token(s, PRECISIONS["32-true"], cpu=True)
                              for s in (shape, plain))
    assert planned - planned_plain == pytest.approx(measured - measured_plain, rel=0.05)
    assert planned == pytest.approx(measured, rel=0.1)


def test_plan_reads_the_tables_parameters_from_the_recipe():
    base = ["--config", str(REPO_ROOT / "experiments" / "wikitext2_cpu.yaml")]
    plain = read_recipe(base, devices=1).model
    model = read_recipe([*base, "--model.config.value_embeddings", "2"], devices=1).model
    assert model.num_layers == 4  # the recipe's: with 2 tables every layer has one, and its scale
    assert model.parameters - plain.parameters == 2 * model.vocab_size * model.kv_size + 4
    assert model.non_embedding_parameters - plain.non_embedding_parameters == 4
    assert (model.value_embedding_rows, model.value_embedding_layers) == (2, 4)
    assert (plain.value_embedding_rows, plain.value_embedding_layers) == (0, 0)


# ------------------------------------------------------------------------------------ other verbs
def test_init_from_names_a_value_embeddings_difference():
    differences = config_differences(GPTConfig(**TINY, value_embeddings=2), GPTConfig(**TINY))
    assert differences == ["value_embeddings: this run 2, checkpoint 0"]


def test_native_exports_refuse_it():
    llama = GPTConfig(**TINY, **LLAMA, value_embeddings=1)
    assert hf_architecture(dataclasses.replace(llama, value_embeddings=0)) == "llama"
    assert hf_architecture(llama) == "lm_gpt"  # lm's own code (trust_remote_code) instead of LlamaForCausalLM
    assert hf_architecture(GPTConfig(**TINY, value_embeddings=1)) == "lm_gpt"  # and not GPT-2 either
    with pytest.raises(LMError, match="differs in value_embeddings=1") as error:
        gguf_architecture(llama)
    assert "\n" not in str(error.value)


def test_int8_quantization_leaves_the_tables_in_float():
    model = tiny(2, **ROPE_GQA)
    quantized = quantize_model(copy.deepcopy(model))
    assert all(type(t) is nn.Embedding for t in quantized.value_embeddings)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(quantized.value_embeddings, model.value_embeddings))
    assert isinstance(quantized.layers[0].attn.qkv_proj, Int8Linear)
    x = token_ids()
    with torch.no_grad():
        reference = model(x)
        assert (quantized(x) - reference).abs().max() < 0.05 * reference.abs().max()


def test_mlp_pruning_keeps_the_tables():
    model = tiny(2)
    smaller = prune_mlp_channels(model, 0.5)
    assert smaller.config.value_embeddings == 2
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(smaller.value_embeddings, model.value_embeddings))


def test_onnx_graph_computes_the_value_embeddings(tmp_path):
    from lm.data.tokenizer import Tokenizer
    from tests.conftest import make_corpus

    tokenizer = Tokenizer.train([make_corpus(20)], vocab_size=300)
    assert_onnx_matches(tiny(3, **{**ROPE_GQA, "vocab_size": tokenizer.vocab_size}), tokenizer, tmp_path / "onnx")


# ------------------------------------------------------------------------------------------------- CLI
def test_lm_fit_with_value_embeddings_then_lm_generate(tmp_path, monkeypatch):
    data = tiny_data(write_corpus_files(tmp_path), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--experiment", "ve", *TINY_MODEL, *TINY_TRAINER, *data, "--model.config.value_embeddings", "2",
          "--model.optimizer", "muon", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"])
    ckpt = tmp_path / "checkpoints" / "ve" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["hyper_parameters"]["config"]["value_embeddings"] == 2
    assert {"model.value_embeddings.0.weight", "model.value_embeddings.1.weight"} <= set(checkpoint["state_dict"])
    model, _ = load_model(ckpt)
    assert model.config.value_embeddings == 2
    assert_lm_generate_matches(ckpt, cwd=tmp_path)
