"""`GPTConfig.bigram_embedding` (a hashed bigram table) and `GPTConfig.smear` (nanochat's gated smear of the previous
token's embedding), the two input levers that read the previous token, in every verb: the model (off = the plain
model, the start = the plain model, gradients), KV-cache decoding equal to the full forward (one row, a left-padded
batch, and the shared-cache `Decoder` that `lm serve` runs, rows joining and leaving), the fast decode paths, the
optimizer's groups, `lm plan`'s counts and activation memory, `--model.init_from`, the exports that refuse them
(GGUF, native transformers classes) or carry them (ONNX), and `lm fit` + `lm generate`.
The Hugging Face folder (lm's own code, `generate` with left padding): tests/test_export_hf.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lm.cli.main import main
from lm.compress.prune import prune_mlp_channels
from lm.errors import LMError
from lm.export.gguf import gguf_architecture
from lm.export.hf import hf_architecture
from lm.io.checkpoints import load_model, read_checkpoint
from lm.model import GPT, Decoder, GPTConfig, build_gpt
from lm.model.layers import NO_PREVIOUS_TOKEN, bigram_hash, previous_token_ids
from lm.modules.init_from import config_differences
from lm.modules.optimizers import MuonWithAdamW, build_optimizer, parameter_groups
from lm.plan.estimate import PRECISIONS, activation_bytes_per_token
from lm.plan.recipe import ModelShape, read_recipe
from tests.conftest import write_corpus_files
from tests.helpers import (REPO_ROOT, TINY_MODEL, TINY_TRAINER, assert_lm_generate_matches, assert_onnx_matches,
                           saved_bytes, tiny_data)

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
LEVERS = {"bigram": dict(bigram_embedding=64), "smear": dict(smear=True),
          "both_rope_gqa": dict(bigram_embedding=64, smear=True, position="rope", num_key_value_heads=2)}
LLAMA = dict(norm="rmsnorm", position="rope", activation="swiglu", bias=False)


def tiny(seed: int = 0, **fields) -> GPT:
    """A GPT whose levers are moved off their start (a zero table, smear_lambda 0), so they show in the logits."""
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**{**TINY, **fields})).eval()
    with torch.no_grad():
        if model.config.bigram_embedding:
            model.bigram_embedding.weight.normal_(0.0, 0.5)
        if model.config.smear:
            model.smear_lambda.fill_(0.8)
            model.smear_gate.normal_(0.0, 1.0)
    return model


def token_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_in_steps(model: GPT, x: torch.Tensor, prefill: int, mask=None, positions=None, decode=None) -> torch.Tensor:
    """Logits of `x` from a prefill of `prefill` tokens, then one token per step through the KV cache."""
    decode = decode or model
    cache = model.new_kv_cache(x.shape[0])
    cut = (lambda t, end: None if t is None else t[:, :end])
    steps = [model(x[:, :prefill], kv_cache=cache, attention_mask=cut(mask, prefill), position_ids=cut(positions, prefill))]
    for t in range(prefill, x.shape[1]):
        steps.append(decode(x[:, t:t + 1], kv_cache=cache, attention_mask=cut(mask, t + 1),
                            position_ids=None if positions is None else positions[:, t:t + 1]))
    return torch.cat(steps, dim=1)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("rows", [-1, 1])
def test_a_bigram_table_of_fewer_than_two_rows_is_refused_in_one_line(rows):
    with pytest.raises(LMError, match="bigram_embedding") as error:
        GPTConfig(**TINY, bigram_embedding=rows)
    assert "\n" not in str(error.value)


def test_the_hash_is_deterministic_in_range_and_reserves_the_last_row_for_no_previous_token():
    current = torch.arange(0, 5000)
    previous = torch.flip(current, [0])
    rows = bigram_hash(previous, current, 4096)
    assert torch.equal(rows, bigram_hash(previous, current, 4096))
    assert 0 <= rows.min() and rows.max() < 4095  # real pairs never land on the reserved row
    assert len(rows.unique()) > 2700  # spread like random draws: 4095 * (1 - exp(-5000 / 4095)) ~ 2890 expected
    assert bigram_hash(torch.tensor([NO_PREVIOUS_TOKEN]), torch.tensor([7]), 4096).item() == 4095
    assert bigram_hash(torch.tensor([3]), torch.tensor([7]), 4096).item() == ((36313 * 7) ^ (27191 * 3)) % 4095


def test_the_previous_token_of_a_left_padded_row_first_real_token_is_none():
    ids = torch.tensor([[5, 5, 10, 11, 12], [20, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    previous = previous_token_ids(ids, attention_mask=mask)
    assert previous[0, 2:].tolist() == [NO_PREVIOUS_TOKEN, 10, 11]
    assert previous[1].tolist() == [NO_PREVIOUS_TOKEN, 20, 21, 22, 23]


# ------------------------------------------------------------------------------------------------ model
def test_off_adds_no_weights_and_on_starts_as_the_plain_model_with_the_same_other_weights():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**TINY)).eval()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    levers = GPT(GPTConfig(**TINY, bigram_embedding=64, smear=True)).eval()
    after_levers = torch.rand(3)
    plain_state, lever_state = plain.state_dict(), levers.state_dict()
    assert not [k for k in plain_state if "bigram" in k or "smear" in k]
    assert set(lever_state) - set(plain_state) == {"bigram_embedding.weight", "smear_gate", "smear_lambda"}
    assert all(torch.equal(plain_state[k], lever_state[k]) for k in plain_state)  # same seed, same other weights
    assert torch.equal(after_plain, after_levers)  # and the run's later random draws are the same too
    assert lever_state["bigram_embedding.weight"].shape == (64, 32) and not lever_state["bigram_embedding.weight"].any()
    assert lever_state["smear_gate"].shape == (1, 24) and lever_state["smear_lambda"].item() == 0.0
    assert 0.0 <= lever_state["smear_gate"].min() and lever_state["smear_gate"].max() <= 0.02
    x = token_ids()
    with torch.no_grad():
        assert torch.equal(levers(x), plain(x))  # a zero table and smear_lambda = 0: exactly the plain model


@pytest.mark.parametrize("lever", LEVERS, ids=list(LEVERS))
def test_each_lever_changes_the_logits_and_reads_only_the_past(lever):
    model, plain = tiny(**LEVERS[lever]), tiny()
    x = token_ids()
    changed = x.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 12, VOCAB)
        assert not torch.allclose(logits, plain(x))
        after = model(changed)
    assert torch.equal(after[:, :6], logits[:, :6])  # causal: a later token changes no earlier logit
    assert not torch.allclose(after[:, 7], logits[:, 7])  # the position after reads it as its previous token


@pytest.mark.parametrize("lever", LEVERS, ids=list(LEVERS))
def test_kv_cache_decoding_equals_the_full_forward(lever):
    model = tiny(**LEVERS[lever])
    x = token_ids(batch=1)
    with torch.no_grad():
        assert (decode_in_steps(model, x, prefill=4) - model(x)).abs().max() < 1e-5
        assert (decode_in_steps(model, x, prefill=1) - model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("lever", LEVERS, ids=list(LEVERS))
def test_a_left_padded_batch_decodes_each_row_as_alone(lever):
    model = tiny(**LEVERS[lever])
    x = token_ids(batch=2, length=12)
    pad = 4
    x[0, :pad] = 0  # row 0: 4 pad tokens, then 8 real ones
    mask = torch.ones_like(x)
    mask[0, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=positions)
        alone = model(x[:1, pad:])
        assert (full[0, pad:] - alone[0]).abs().max() < 1e-5  # the pad is not the first token's previous token
        assert (full[1] - model(x[1:])[0]).abs().max() < 1e-5
        steps = decode_in_steps(model, x, prefill=6, mask=mask, positions=positions)
        assert (steps[0, pad:] - full[0, pad:]).abs().max() < 1e-5
        assert (steps[1] - full[1]).abs().max() < 1e-5


def test_the_serving_decoder_keeps_each_row_previous_token_as_rows_join_shift_and_leave():
    """lm serve's `Decoder`: rows share one cache, join at different times (left padding, a narrowed view), a
    retired row's slot is reused by the last row, and the columns shift left when they run out: each row's logits
    stay those of its own sequence alone."""
    model = tiny(**LEVERS["both_rope_gqa"])
    sequences = [token_ids(1, 16, seed=s)[0].tolist() for s in (2, 3)]
    decoder = Decoder(model, capacity=3, max_length=16)
    rows: list[tuple[int, int]] = []  # (sequence, tokens so far) of each active row

    def check(logits: torch.Tensor, active: list[tuple[int, int]]) -> None:
        for row, (sequence, length) in zip(logits, active):
            alone = model(torch.tensor([sequences[sequence][:length]]))[0, -1]
            assert (row - alone).abs().max() < 1e-5, (sequence, length)

    def step() -> None:
        tokens = torch.tensor([sequences[sequence][length] for sequence, length in rows])
        rows[:] = [(sequence, length + 1) for sequence, length in rows]
        check(decoder.step(tokens), rows)

    with torch.no_grad():
        rows.append((0, 5))
        check(decoder.admit([sequences[0][:5]]), rows)
        step(), step()
        rows.append((1, 3))  # a shorter prompt joins next to the running row: left-padded, a narrowed cache
        check(decoder.admit([sequences[1][:3]]), rows[1:])
        step(), step()
        decoder.retire(0)  # the first row leaves: the second moves into its slot
        rows.pop(0)
        for _ in range(9):  # its columns reach the right edge and shift left on the way
            step()
    assert rows == [(1, 14)]


def test_gradients_reach_the_table_the_gate_and_the_scale():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, bigram_embedding=64, smear=True)).train()
    model(token_ids()).logsumexp(-1).mean().backward()
    assert model.bigram_embedding.weight.grad.abs().sum() > 0  # at its zero start
    assert model.smear_lambda.grad.abs() > 0  # at 0: the scale in front gets gradient...
    assert not model.smear_gate.grad.any()  # ...and the gate none until it moves (as in nanochat)
    model.zero_grad()
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
    model(token_ids()).logsumexp(-1).mean().backward()
    assert model.smear_gate.grad.abs().sum() > 0


def test_embedding_dropout_and_activation_checkpointing_keep_training_consistent():
    torch.manual_seed(0)
    model = tiny(**LEVERS["both_rope_gqa"], embedding_dropout=0.2).train()
    x = token_ids()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(5)
        model(x).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in (model.bigram_embedding.weight, model.smear_gate, model.smear_lambda)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_prepared_for_inference_decodes_the_same_logits():
    model = tiny(**LEVERS["both_rope_gqa"])
    reference = copy.deepcopy(model)
    model.prepare_for_inference()
    x = token_ids(length=10)
    with torch.no_grad():
        steps = decode_in_steps(model, x, prefill=4, decode=lambda ids, **kw: model.decode(ids, **kw))
        assert (steps - reference(x)).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decode_step_decodes_the_same_logits_left_padded_too():
    model = tiny(**LEVERS["both_rope_gqa"])
    reference = copy.deepcopy(model)
    model.prepare_for_inference(compile=True)
    x = token_ids(batch=2, length=8)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        steps = decode_in_steps(model, x, prefill=4, decode=lambda ids, **kw: model.decode(ids, **kw))
        assert (steps - reference(x)).abs().max() < 1e-4
        steps = decode_in_steps(model, x, prefill=4, mask=mask, positions=positions,
                                decode=lambda ids, **kw: model.decode(ids, **kw))
        full = reference(x, attention_mask=mask, position_ids=positions)
        assert (steps[0, 2:] - full[0, 2:]).abs().max() < 1e-4 and (steps[1] - full[1]).abs().max() < 1e-4


def test_parameter_counts_include_the_table_and_exclude_it_as_an_embedding():
    plain, model = tiny(), tiny(bigram_embedding=64, smear=True)
    assert model.num_parameters() == plain.num_parameters() + 64 * 32 + 24 + 1
    assert model.num_parameters(exclude_embeddings=True) == plain.num_parameters(exclude_embeddings=True) + 24 + 1
    assert model.flops_per_token() == plain.flops_per_token()  # a lookup and a 24-wide dot product: no matmul


def test_pruning_keeps_the_levers():
    model = tiny(**LEVERS["both_rope_gqa"])
    smaller = prune_mlp_channels(model, 0.5)
    assert (smaller.config.bigram_embedding, smaller.config.smear) == (64, True)
    assert torch.equal(smaller.bigram_embedding.weight, model.bigram_embedding.weight)
    assert torch.equal(smaller.smear_gate, model.smear_gate)


# ------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_table_gate_and_scale_go_to_adamw_without_weight_decay(optimizer):
    model = tiny(**LLAMA, bigram_embedding=64, smear=True)
    levers = {id(model.bigram_embedding.weight), id(model.smear_gate), id(model.smear_lambda)}
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert levers <= {id(p) for p in no_decay["params"]}
    assert not levers & {id(p) for p in decay["params"]}
    built = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), optimizer=optimizer)
    adamw = built.adamw if isinstance(built, MuonWithAdamW) else built
    in_adamw = {id(p): group["weight_decay"] for group in adamw.param_groups for p in group["params"]}
    assert all(in_adamw.get(i) == 0.0 for i in levers)


# ------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("lever", ["bigram", "smear"])
def test_plan_activation_formula_counts_what_the_levers_keep(lever):
    fields = {"bigram": dict(bigram_embedding=512), "smear": dict(smear=True, hidden_size=128)}[lever]
    config = GPTConfig(**{**TINY, **fields})
    c = GPT(config).config
    shape = ModelShape(parameters=0, non_embedding_parameters=0, flops_per_token=0, sequence_length=32,
                       vocab_size=VOCAB, hidden_size=c.hidden_size, num_layers=2, num_heads=4,
                       kv_size=c.num_key_value_heads * c.head_dim, intermediate_size=c.intermediate_size,
                       activation=c.activation, attention=c.attention, position=c.position, qk_norm=c.qk_norm,
                       dropout=c.dropout, largest_unit_parameters=0, smear_gate_channels=24 if c.smear else 0,
                       bigram_embedding=bool(c.bigram_embedding))
    plain = dataclasses.replace(shape, smear_gate_channels=0, bigram_embedding=False)
    x = token_ids(batch=4, length=32)
    torch.manual_seed(0)
    measured, _ = saved_bytes(GPT(config).train(), x)
    torch.manual_seed(0)
    measured_plain, _ = saved_bytes(GPT(dataclasses.replace(config, bigram_embedding=0, smear=False)).train(), x)
    planned, planned_plain = (4 * 32 * activation_bytes_per_token(s, PRECISIONS["32-true"], cpu=True)
                              for s in (shape, plain))
    assert measured > measured_plain
    assert planned - planned_plain == pytest.approx(measured - measured_plain, rel=0.05)


def test_plan_reads_the_levers_from_the_recipe():
    base = ["--config", str(REPO_ROOT / "experiments" / "wikitext2_cpu.yaml")]
    plain = read_recipe(base, devices=1).model
    model = read_recipe([*base, "--model.config.bigram_embedding", "4096", "--model.config.smear", "true"],
                        devices=1).model
    assert model.parameters - plain.parameters == 4096 * model.hidden_size + 24 + 1
    assert model.non_embedding_parameters - plain.non_embedding_parameters == 24 + 1
    assert (model.smear_gate_channels, model.bigram_embedding) == (24, True)
    assert (plain.smear_gate_channels, plain.bigram_embedding) == (0, False)


# ------------------------------------------------------------------------------------ other verbs
def test_init_from_names_the_differences():
    differences = config_differences(GPTConfig(**TINY, bigram_embedding=64, smear=True), GPTConfig(**TINY))
    assert differences == ["bigram_embedding: this run 64, checkpoint 0", "smear: this run True, checkpoint False"]


@pytest.mark.parametrize("lever", [dict(bigram_embedding=64), dict(smear=True)])
def test_native_exports_refuse_them(lever):
    llama = GPTConfig(**TINY, **LLAMA)
    assert hf_architecture(llama) == "llama"
    assert hf_architecture(dataclasses.replace(llama, **lever)) == "lm_gpt"  # lm's own code instead
    assert hf_architecture(GPTConfig(**TINY, **lever)) == "lm_gpt"  # and not GPT-2 either
    name = next(iter(lever))
    with pytest.raises(LMError, match=f"differs in {name}=") as error:
        gguf_architecture(dataclasses.replace(llama, **lever))
    assert "\n" not in str(error.value)


def test_onnx_graph_computes_the_levers(tmp_path):
    from lm.data.tokenizer import Tokenizer
    from tests.conftest import make_corpus

    tokenizer = Tokenizer.train([make_corpus(20)], vocab_size=300)
    assert_onnx_matches(tiny(**{**LEVERS["both_rope_gqa"], "vocab_size": tokenizer.vocab_size}), tokenizer,
                        tmp_path / "onnx")


# ------------------------------------------------------------------------------------------------- CLI
def test_lm_fit_with_both_levers_then_lm_generate(tmp_path, monkeypatch):
    data = tiny_data(write_corpus_files(tmp_path), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--experiment", "levers", *TINY_MODEL, *TINY_TRAINER, *data, "--model.config.bigram_embedding",
          "4096", "--model.config.smear", "true", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"])
    ckpt = tmp_path / "checkpoints" / "levers" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    config = checkpoint["hyper_parameters"]["config"]
    assert (config["bigram_embedding"], config["smear"]) == (4096, True)
    state = checkpoint["state_dict"]
    assert state["model.bigram_embedding.weight"].shape == (4096, 32) and state["model.bigram_embedding.weight"].any()
    assert state["model.smear_lambda"].item() != 0.0  # trained off its start
    model, _ = load_model(ckpt)
    assert (model.config.bigram_embedding, model.config.smear) == (4096, True)
    assert_lm_generate_matches(ckpt, cwd=tmp_path)
