"""int8 quantization, pruning, distillation loss and exports (safetensors, Hugging Face, ONNX) on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lm.io.checkpoints import load_model, save_model
from lm.compress.prune import prune_mlp_channels, prune_unstructured, sparsity_of
from lm.compress.quantize import Int8Embedding, Int8Linear, linear_weight_bytes, quantize_model
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.model import GPT, GPTConfig, build_gpt
from lm.model.generation import SamplingOptions, generate
from tests.conftest import make_corpus
from tests.helpers import REPO_ROOT

GPT2_LIKE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
LLAMA_LIKE = dict(GPT2_LIKE, num_key_value_heads=2, norm="rmsnorm", position="rope", activation="swiglu", bias=False)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([make_corpus(20)], vocab_size=300)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**{**GPT2_LIKE, **overrides})).eval()
    with torch.no_grad():  # trained-looking weights: biases and norm gains away from their init
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model: GPT, tokenizer: Tokenizer, path) -> str:
    save_model(path, model, tokenizer)
    return str(path)


def ids(tokenizer: Tokenizer, n: int = 20) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(make_corpus(1, seed=5))[:n]])


# ----------------------------------------------------------------------------------- quantization
def test_int8_logits_close_to_fp32_and_tied_matrix_stored_once(tokenizer):
    model = tiny_gpt()
    x = ids(tokenizer)
    with torch.no_grad():
        reference = model(x)
        quantized = quantize_model(copy.deepcopy(model))
        logits = quantized(x)
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.embed_tokens, Int8Embedding)
    error = (logits - reference).abs().max().item()
    assert error < 0.02 * reference.abs().max().item(), error
    # The embedding reads the head's int8 rows: one matrix, close to the fp32 one.
    assert not any(k.startswith("embed_tokens.") for k in quantized.state_dict())
    embedded = quantized.embed_tokens(x)
    assert (embedded - model.embed_tokens(x)).abs().max() <= model.embed_tokens.weight.abs().max() / 127
    assert linear_weight_bytes(model) / linear_weight_bytes(quantized) > 3.5


def test_int8_packed_weight_is_reused_and_follows_changed_weights():
    """The kernel's packed copy of the weight is a cache: reused while the weights stand, rebuilt after
    an in-place change (`load_state_dict`) or a replaced buffer, never stale."""
    torch.manual_seed(0)
    layer, other = Int8Linear.from_linear(nn.Linear(32, 16)), Int8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(1, 1, 32)

    def expected(module):
        return torch.nn.functional.linear(x, module.dequantized_weight(), module.bias)

    with torch.no_grad():
        first = layer(x)
        packed = layer._packed
        layer(x)
        if packed is not None:  # a CPU with the quantized engine: the same packed copy serves again
            assert layer._packed is packed
        assert (first - expected(layer)).abs().max() < 0.05
        layer.load_state_dict(other.state_dict())  # in place: version counters move
        assert (layer(x) - expected(other)).abs().max() < 0.05
        layer.weight_int8 = -other.weight_int8.clone()  # a new buffer object
        assert (layer(x) - expected(layer)).abs().max() < 0.05
        assert (layer(x) - expected(other)).abs().max() > 0.1


def test_quantized_checkpoint_reloads_and_generates(tokenizer, tmp_path):
    from lm.commands.compress import quantize

    model = tiny_gpt()
    source = save(model, tokenizer, tmp_path / "fp32.ckpt")
    quantize(ckpt_path=source, output=str(tmp_path / "int8.ckpt"))
    loaded, loaded_tokenizer = load_model(tmp_path / "int8.ckpt")
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 1 + 4 * 2  # head + 4 per block
    x = ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantize_model(copy.deepcopy(model))(x))
    assert generate(loaded, x, max_new_tokens=5, temperature=0).shape == (1, x.shape[1] + 5)
    with pytest.raises(LMError, match="already quantized"):
        quantize(ckpt_path=str(tmp_path / "int8.ckpt"), output=str(tmp_path / "again.ckpt"))
    with pytest.raises(LMError, match="overwrite"):
        quantize(ckpt_path=source, output=str(tmp_path / "int8.ckpt"))


def test_quantized_checkpoint_loads_and_generates_in_bfloat16(tokenizer, tmp_path):
    """`lm generate --dtype bfloat16` (and `lm serve --dtype bfloat16`) on an `lm quantize` checkpoint: the tied
    int8 embedding hands the blocks bf16 activations, like the rest of the model (it used to return fp32 and
    the first norm stopped with "mixed dtype (CPU)"), and the logits stay close to the fp32 int8 model's."""
    from lm.commands.compress import quantize
    from lm.commands.generate import generate as generate_command

    source = save(tiny_gpt(), tokenizer, tmp_path / "fp32.ckpt")
    quantize(ckpt_path=source, output=str(tmp_path / "int8.ckpt"))
    fp32, _ = load_model(tmp_path / "int8.ckpt")
    bf16, _ = load_model(tmp_path / "int8.ckpt", dtype=torch.bfloat16)
    x = ids(tokenizer)
    assert bf16.embed_tokens(x).dtype == bf16.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        reference, logits = fp32(x), bf16(x)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert generate(bf16, x, max_new_tokens=5, temperature=0).shape == (1, x.shape[1] + 5)
    generate_command(ckpt_path=str(tmp_path / "int8.ckpt"), prompt=["The river", "A small town"], dtype="bfloat16",
                     sampling=SamplingOptions(max_new_tokens=4, temperature=0), format="jsonl")


def test_compiled_int8_decode_is_the_weight_only_product(tokenizer):
    """`prepare_for_inference(compile=True)` on an int8 model: the compiled decode step multiplies fp32
    activations by the int8 weights (no packed op inside the graph), so it decodes exactly what an fp32
    model holding the dequantized weights decodes, compiled (first, in the same process: each model's compiled
    step keeps its own graphs) or not."""
    model = tiny_gpt()
    quantized = quantize_model(copy.deepcopy(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):
                twin.get_submodule(name).weight.copy_(module.dequantized_weight())
    x = ids(tokenizer, 8)
    expected = generate(twin, x, max_new_tokens=12, temperature=0)
    twin.prepare_for_inference(compile=True)
    assert torch.equal(generate(twin, x, max_new_tokens=12, temperature=0), expected)
    quantized.prepare_for_inference(compile=True)
    assert torch.equal(generate(quantized, x, max_new_tokens=12, temperature=0), expected)


# ---------------------------------------------------------------------------------------- pruning
def test_unstructured_sparsity_exact_and_kept_after_save_load(tokenizer, tmp_path):
    from lm.commands.compress import prune

    model = tiny_gpt()
    source = save(model, tokenizer, tmp_path / "fp32.ckpt")
    n = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))
    pruned = prune_unstructured(copy.deepcopy(model), 0.3)
    assert sparsity_of(pruned) == round(0.3 * n) / n
    assert not any("weight_orig" in k or "mask" in k for k in pruned.state_dict())  # permanent
    # the smallest weights went: every surviving |w| >= every removed one's
    kept = torch.cat([m.weight.flatten() for m in pruned.layers.modules() if isinstance(m, nn.Linear)])
    original = torch.cat([m.weight.flatten() for m in model.layers.modules() if isinstance(m, nn.Linear)])
    assert original[kept == 0].abs().max() <= original[kept != 0].abs().min()
    assert torch.equal(pruned.embed_tokens.weight, model.embed_tokens.weight)  # tied matrix left dense
    prune(ckpt_path=source, output=str(tmp_path / "p50.ckpt"), method="unstructured", sparsity=0.5)
    loaded, _ = load_model(tmp_path / "p50.ckpt")
    assert sparsity_of(loaded) == round(0.5 * n) / n


@pytest.mark.parametrize("variant", [GPT2_LIKE, LLAMA_LIKE], ids=["gelu", "swiglu"])
def test_mlp_channel_pruning_shrinks_tensors_and_still_generates(tokenizer, tmp_path, variant):
    from lm.commands.compress import prune

    model = tiny_gpt(**variant)
    size = model.config.intermediate_size
    smaller = prune_mlp_channels(model, 0.5)
    assert smaller.config.intermediate_size == size // 2
    assert smaller.num_parameters() < model.num_parameters()
    down = smaller.layers[0].mlp.down_proj.weight
    assert down.shape == (model.config.hidden_size, size // 2)
    source = save(model, tokenizer, tmp_path / "fp32.ckpt")
    prune(ckpt_path=source, output=str(tmp_path / "mlp.ckpt"), method="mlp_channels", sparsity=0.5)
    loaded, _ = load_model(tmp_path / "mlp.ckpt")
    assert loaded.config.intermediate_size == size // 2
    x = ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(x), smaller(x))
    assert generate(loaded, x, max_new_tokens=5, temperature=0).shape == (1, x.shape[1] + 5)


def test_mlp_channel_pruning_keeps_the_strongest_channels():
    model = tiny_gpt()
    with torch.no_grad():  # channel 7 of layer 0 dominates; channel 3 is dead
        model.layers[0].mlp.up_proj.weight[7] *= 100
        model.layers[0].mlp.up_proj.weight[3] = 0
    smaller = prune_mlp_channels(model, 0.5)
    kept_rows = smaller.layers[0].mlp.up_proj.weight
    assert any(torch.equal(row, model.layers[0].mlp.up_proj.weight[7]) for row in kept_rows)
    assert not any(torch.equal(row, model.layers[0].mlp.up_proj.weight[3]) for row in kept_rows)


def test_head_pruning_and_bad_sparsity_explain_themselves(tokenizer, tmp_path):
    from lm.commands.compress import prune

    source = save(tiny_gpt(), tokenizer, tmp_path / "fp32.ckpt")
    with pytest.raises(LMError, match="mlp_channels"):
        prune(ckpt_path=source, output=str(tmp_path / "h.ckpt"), method="heads", sparsity=0.25)
    with pytest.raises(LMError, match="sparsity"):
        prune(ckpt_path=source, output=str(tmp_path / "u.ckpt"), method="unstructured", sparsity=1.5)


# ----------------------------------------------------------------------------------- distillation
def test_kl_term_is_zero_when_student_equals_teacher():
    from lm.modules.distill import distillation_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 300)
    targets = torch.randint(0, 300, (2, 5))
    targets[0, 0] = -100  # ignored position
    loss, kl, ce = distillation_loss(logits, logits.clone(), targets, alpha=0.5, temperature=2.0)
    assert abs(kl.item()) < 1e-6
    assert torch.allclose(loss, 0.5 * ce)
    _, kl_other, _ = distillation_loss(logits, torch.randn(2, 5, 300), targets, alpha=0.5, temperature=2.0)
    assert kl_other > 0.1


def test_distiller_refuses_a_teacher_with_another_tokenizer(tokenizer):
    from lm.modules.distill import Distiller

    student = Distiller(config=GPTConfig(**GPT2_LIKE))
    student.set_tokenizer(tokenizer)
    other = Tokenizer.train([make_corpus(20, seed=9) + " zebra quartz"], vocab_size=290)
    with pytest.raises(LMError, match="tokenizer_path"):
        student.set_teacher(tiny_gpt(), other)
    student.set_teacher(tiny_gpt(), tokenizer)
    assert "teacher" not in dict(student.named_children()) and not any("teacher" in k for k in student.state_dict())


# ---------------------------------------------------------------------------------------- exports
def test_safetensors_export_round_trips(tokenizer, tmp_path):
    from lm.export.safetensors import export_safetensors, load_folder

    model = tiny_gpt()
    export_safetensors(model, tokenizer, tmp_path / "st")
    loaded, loaded_tokenizer = load_folder(tmp_path / "st")
    x = ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight and loaded_tokenizer.to_str() == tokenizer.to_str()


# The Hugging Face export (every variant, native or lm's own code): tests/test_export_hf.py.


@pytest.mark.parametrize("context_cache", [False, True])
def test_onnx_export_runs_in_onnxruntime(tokenizer, tmp_path, context_cache):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lm.export.onnx import export_onnx

    model = tiny_gpt(context_cache=context_cache)
    if context_cache:  # the graph holds the calibrated mixture (with a copy from the window to make)
        model.context_cache.weight.fill_(0.3), model.context_cache.temperature.fill_(1.1)
    export_onnx(model, tokenizer, tmp_path / "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for x in (ids(tokenizer, 20), ids(tokenizer, 1), torch.cat([ids(tokenizer, 7)] * 3)):  # dynamic batch / length
        (logits,) = session.run(["logits"], {"input_ids": x.numpy()})
        with torch.no_grad():
            expected = model(x, context_cache=True) if context_cache else model(x)
            assert (torch.from_numpy(logits) - expected).abs().max() < 1e-4


def test_onnx_export_of_a_model_with_dropout_is_the_inference_graph(tokenizer, tmp_path, recwarn):
    """A model left in training mode with dropout (the CPU recipe has 0.2) exports the inference graph:
    no dropout in it, and no "exporting a model while it is in training mode" warning."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lm.export.onnx import export_onnx

    model = tiny_gpt(dropout=0.5).train()
    export_onnx(model, tokenizer, tmp_path / "onnx")
    assert not [w for w in recwarn if "training mode" in str(w.message)]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = ids(tokenizer, 20)
    (logits,) = session.run(["logits"], {"input_ids": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(logits) - model.eval()(x)).abs().max() < 1e-4


def test_recovery_fine_tune_starts_from_pruned_weights_and_keeps_zeros(tmp_path, monkeypatch, corpus_files):
    """experiments/finetune_pruned.yaml: `--model.init_from` loads the pruned weights, training moves
    them, KeepPrunedZeros holds the pruned ones at zero."""
    from lm.io.checkpoints import read_checkpoint
    from lm.cli.main import main
    from tests.helpers import REPO_ROOT, TINY_MODEL, tiny_data
    from tests.tiny_checkpoint import tiny_gpt as tiny_run_gpt, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = tiny_tokenizer(300)
    pruned = prune_unstructured(tiny_run_gpt(tokenizer.vocab_size, seed=3), 0.5)
    path = save(pruned, tokenizer, tmp_path / "pruned.ckpt")
    trainer = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "3",
               "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", str(REPO_ROOT / "experiments" / "finetune_pruned.yaml"), *TINY_MODEL, *trainer,
          *tiny_data(corpus_files, tmp_path / "cache"), "--model.init_from", path, "--model.learning_rate", "1e-2"])
    state = {k[len("model."):]: v for k, v in read_checkpoint("checkpoints/finetune_pruned/last.ckpt")["state_dict"].items()}
    tuned = copy.deepcopy(pruned)
    tuned.load_state_dict(state)
    assert sparsity_of(tuned) == sparsity_of(pruned) == 0.5
    for name, weight in pruned.named_parameters():  # the same zeros, and the other weights trained
        if name.startswith("layers.") and weight.dim() == 2:
            assert torch.equal(state[name] == 0, weight == 0)
            assert not torch.equal(state[name], weight)
