"""The single-device memory levers: activation checkpointing (`--model.activation_checkpointing`) and the
chunked LM head + loss (`--model.loss_chunk_size`). Each gives the plain step's loss and gradients (dropout
on), the same validation metrics, really keeps less (saved tensors, the head's outputs, a step's measured
peak), refuses a bad value in one line, and `lm plan` predicts the drop in a real step's peak."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from lm.errors import LMError
from lm.evaluation.token_losses import IGNORE_INDEX
from lm.model import GPT, GPTConfig
from lm.model.layers import Block
from lm.modules.distill import Distiller
from lm.modules.language_model import LanguageModel, check_single_checkpointing, chunked_token_nll
from lm.modules.optimizers import fast_bf16_matmul
from lm.plan.estimate import memory_per_device
from lm.plan.probe import measure_step_memory
from lm.plan.recipe import read_recipe
from tests.helpers import REPO_ROOT, run_lm

CPU_RECIPE = str(REPO_ROOT / "experiments" / "wikitext2_cpu.yaml")
VOCAB, BATCH, CONTEXT = 97, 3, 16
# Dropout everywhere it exists (residual, attention, whole token types), and soft-capped logits: the
# recomputation must redraw the same masks and go through the same cap.
DROPOUT = dict(dropout=0.1, attention_dropout=0.1, embedding_dropout=0.1, logit_softcap=15.0)
VARIANTS = {
    "gpt2-like": dict(DROPOUT),
    "llama-like": dict(DROPOUT, position="rope", qk_norm=True, norm="rmsnorm", activation="swiglu",
                       num_key_value_heads=2, tie_embeddings=False, residual_scalars=True),
}
LEVERS = {"checkpointing": dict(activation_checkpointing=True), "chunked loss": dict(loss_chunk_size=7),
          "both": dict(activation_checkpointing=True, loss_chunk_size=5)}


def _config(**variant) -> GPTConfig:
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=CONTEXT)
    return GPTConfig(**{**sizes, **variant})


def _batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=generator)
    targets[0, :5] = IGNORE_INDEX  # masked tokens (padding, a prompt) are scored by neither path
    targets[2, -3:] = IGNORE_INDEX
    return input_ids, targets


def _module(config: GPTConfig, **levers) -> LanguageModel:
    torch.manual_seed(0)  # the same weights for every lever
    return LanguageModel(config, **levers).train()


def _step(module: LanguageModel, seed: int = 2, bf16: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss and every parameter's gradient, with the dropout masks of `seed`."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = module.training_loss(_batch())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lever", LEVERS)
def test_levers_give_the_loss_and_gradients_of_the_plain_step(lever, variant):
    config = _config(**VARIANTS[variant])
    plain_loss, plain_grads = _step(_module(config))
    loss, grads = _step(_module(config, **LEVERS[lever]))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # Not equal by accident: other dropout masks give other gradients, so the recomputation drew the same ones.
    _, other_masks = _step(_module(config), seed=3)
    assert max((other_masks[n] - plain_grads[n]).abs().max().item() for n in grads) > 1e-3


@pytest.mark.parametrize("lever", LEVERS)
def test_levers_under_bf16_autocast_match_the_plain_bf16_step(lever):
    config = _config(**VARIANTS["gpt2-like"])
    plain_loss, plain_grads = _step(_module(config), bf16=True)
    loss, grads = _step(_module(config, **LEVERS[lever]), bf16=True)
    # The same bf16 matmuls on the same inputs; the chunked loss sums its chunks in another order. Its head (tied to
    # the embeddings) gets one bf16 weight gradient per chunk, each rounded to 8 bits before they are added: an entry
    # may be off by a few roundings of the largest partial sums, so the tolerance scales with the gradient's size
    # (a fixed 2e-4 passed or failed with the dropout masks' seed).
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-4)
    for name in grads:
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=2e-2, atol=2e-4 + 2 ** -6 * scale, msg=name)


def _saved_storages(run) -> dict[int, int]:
    """Bytes of each distinct storage autograd saves for backward while `run()` runs (parameters excluded)."""
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


def _saved_bytes(run) -> int:
    return sum(_saved_storages(run).values())


def test_checkpointing_keeps_only_the_blocks_inputs_and_only_in_training():
    config = _config(num_hidden_layers=4)
    plain, checkpointed = GPT(config).train(), GPT(config).train()
    checkpointed.activation_checkpointing = True
    input_ids = _batch()[0]
    kept, kept_checkpointed = _saved_bytes(lambda: plain(input_ids)), _saved_bytes(lambda: checkpointed(input_ids))
    assert kept_checkpointed < kept / 3
    # Evaluation and generation (no grad, KV cache) never recompute: the same logits, the same cache.
    checkpointed.load_state_dict(plain.state_dict())
    plain.eval(), checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(input_ids), plain(input_ids), rtol=0, atol=0)
        caches = plain.new_kv_cache(BATCH), checkpointed.new_kv_cache(BATCH)
        torch.testing.assert_close(checkpointed(input_ids, kv_cache=caches[1]), plain(input_ids, kv_cache=caches[0]))
        assert caches[1].length == CONTEXT


def test_chunked_loss_never_holds_the_full_logits():
    vocab, chunk = 4096, 8  # a vocabulary large enough that the logits outweigh the activations
    config = _config(**VARIANTS["gpt2-like"], vocab_size=vocab)
    module = _module(config, loss_chunk_size=chunk)
    head_outputs: list[int] = []
    module.model.lm_head.register_forward_hook(lambda m, args, output: head_outputs.append(output.numel()))
    input_ids, targets = _batch()
    losses = []
    saved = _saved_storages(lambda: losses.append(module.training_loss((input_ids, targets))))
    losses[0].backward()
    tokens = BATCH * CONTEXT
    chunks = -(-tokens // chunk)
    # Each chunk's logits once in the forward and once more in the backward (recomputed, not kept).
    assert len(head_outputs) == 2 * chunks and max(head_outputs) == chunk * vocab
    full_logits = tokens * vocab * 4
    assert max(saved.values()) < full_logits / 4
    plain = _module(config)
    plain_saved = _saved_storages(lambda: plain.training_loss((input_ids, targets)))
    assert max(plain_saved.values()) >= full_logits  # the plain path keeps the fp32 log-softmax of every token
    assert sum(plain_saved.values()) - sum(saved.values()) >= full_logits


def test_chunked_nll_equals_the_plain_one_with_and_without_grad():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    hidden, targets = torch.randn(3, 10, 8), torch.randint(0, VOCAB, (3, 10))
    targets[1] = IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    for chunk in (1, 4, 7, 30, 100):
        with torch.no_grad():
            nll, count = chunked_token_nll(head, hidden, targets, chunk)
        torch.testing.assert_close(nll, plain.detach(), rtol=1e-6, atol=1e-5)
        assert count == 20


def test_validation_metrics_are_unchanged_by_the_chunked_loss():
    config = _config(**VARIANTS["gpt2-like"])
    results = []
    for levers in ({}, {"loss_chunk_size": 7}):
        module = _module(config, **levers).eval()
        module.token_bytes = torch.arange(VOCAB) % 5 + 1  # as set_tokenizer sets it: UTF-8 bytes per token
        with torch.no_grad():
            for seed in (1, 2):
                module.validation_step(_batch(seed), 0)
        results.append(module.val_metrics.compute())
    assert results[0].keys() == results[1].keys() == {"loss", "ppl", "bpb"}
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [0, -8])
def test_a_chunk_size_below_one_is_refused_in_one_line(bad):
    with pytest.raises(LMError, match=r"model.loss_chunk_size must be a positive number of tokens") as error:
        LanguageModel(_config(), loss_chunk_size=bad)
    assert "\n" not in str(error.value)


def test_a_chunk_size_below_one_is_refused_by_the_command_line(tmp_path):
    result = run_lm("plan", "--config", CPU_RECIPE, "--device_kind", "h100", "--model.loss_chunk_size", "0", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.split("error: ", 1)[1].split("(set LM_DEBUG=1", 1)[0].strip()
    assert "\n" not in message and "loss_chunk_size must be a positive number of tokens" in message, result.stderr
    assert "Traceback" not in result.stderr


def test_the_chunked_loss_is_refused_for_a_model_with_its_own_objective():
    with pytest.raises(LMError, match=r"Distiller overrides training_step"):
        Distiller(config=_config(), loss_chunk_size=64)


def test_checkpointing_twice_under_fsdp_is_refused():
    policy = FSDPStrategy(activation_checkpointing_policy={Block})
    with pytest.raises(LMError, match="Activation checkpointing is set twice"):
        check_single_checkpointing(True, policy)
    check_single_checkpointing(False, policy)  # FSDP's own alone
    check_single_checkpointing(True, FSDPStrategy())  # the model's own alone
    with pytest.raises(LMError, match="Activation checkpointing is set twice"):
        read_recipe(["--config", str(REPO_ROOT / "experiments" / "wikitext2_gpt2_small.yaml"),
                     "--config", str(REPO_ROOT / "experiments" / "trainer" / "fsdp.yaml"),
                     "--model.activation_checkpointing", "true"], devices=8)


@pytest.mark.slow
def test_checkpointing_composes_with_torch_compile():
    config = _config(num_hidden_layers=2)  # no dropout: compiled and eager draw random numbers differently
    plain = _module(config)
    compiled = _module(config, activation_checkpointing=True)
    compiled.model.compile()
    plain_loss, plain_grads = _step(plain)
    loss, grads = _step(compiled)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_plan_counts_each_lever_where_it_acts():
    args = ["--config", CPU_RECIPE, "--trainer.precision", "32-true", "--data.vocab_size", "50257"]
    base = read_recipe(args, devices=1)
    chunked = read_recipe(args + ["--model.loss_chunk_size", "1024"], devices=1)
    checkpointed = read_recipe(args + ["--model.activation_checkpointing", "true"], devices=1)
    assert (chunked.setup.loss_chunk_size, checkpointed.setup.activation_checkpointing) == (1024, True)
    assert checkpointed.setup.checkpointing_in_model and checkpointed.setup.strategy == "single"
    plain, less_logits, less_activations = (memory_per_device(r.model, r.setup) for r in (base, chunked, checkpointed))
    tokens = base.setup.micro_batch * base.model.sequence_length  # 4 x 512: twice the chunk
    assert less_logits["temporary logits"] == pytest.approx(
        plain["temporary logits"] / 2 + base.model.vocab_size * base.model.hidden_size * 4)
    assert tokens == 2048 and less_logits["activations"] == plain["activations"]
    assert less_activations["activations"] < plain["activations"] / 3
    assert less_activations["temporary logits"] == plain["temporary logits"]
    # A chunk as large as the batch is the plain path.
    assert memory_per_device(base.model, replace(base.setup, loss_chunk_size=tokens)) == plain


@pytest.mark.slow
@pytest.mark.parametrize("lever, shape, precision", [
    (["--model.loss_chunk_size", "128"],  # logits-bound: vocab 50,257
     ["--model.config.num_hidden_layers", "1", "--model.config.hidden_size", "64", "--data.vocab_size", "50257",
      "--model.config.max_position_embeddings", "256"], "32-true"),
    # the default recipe's own shape: 4 x 256, 4 x 512 tokens; under CPU bf16 autocast too, where bf16 is emulated
    # (AVX2: ~40 s a step of that shape) in 2 x 256 with a 1,024-token vocabulary
    (["--model.activation_checkpointing", "true"], [], "32-true"),
    (["--model.activation_checkpointing", "true"], [] if fast_bf16_matmul(torch.device("cpu")) else
     ["--model.config.num_hidden_layers", "2", "--data.vocab_size", "1024"],
     "bf16-mixed"),
])
def test_a_real_steps_peak_drops_as_the_plan_predicts(lever, shape, precision):
    args = ["--config", CPU_RECIPE, "--model.optimizer", "adamw", *shape]
    measured = {}
    predicted = {}
    for name, extra in (("plain", []), ("lever", lever)):
        measured[name] = measure_step_memory(args + extra, precision)["step_peak"]
        recipe = read_recipe(args + extra + ["--trainer.precision", precision], devices=1)
        predicted[name] = sum(memory_per_device(recipe.model, replace(recipe.setup, accelerator="cpu")).values())
    measured_drop, predicted_drop = measured["plain"] - measured["lever"], predicted["plain"] - predicted["lever"]
    assert predicted_drop > 20 * 2**20  # a drop well above the measurement's noise (~1 MiB)
    assert measured_drop == pytest.approx(predicted_drop, rel=0.15), (measured, predicted)
