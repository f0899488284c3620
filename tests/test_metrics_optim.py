"""Token-weighted metrics, optimizer parameter groups and the LR schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from lm.evaluation.token_metrics import LanguageModelingMetrics
from lm.model import GPT, GPTConfig
from lm.modules.optimizers import build_optimizer, lr_multiplier, parameter_groups, warmup_cosine


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


def test_wsd_schedule_is_flat_then_cools_down_linearly():
    lrs = [lr_multiplier(step, (step - 5) / 95, 5, 0.1, "wsd", cooldown_fraction=0.2) for step in range(101)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    stable_end = 5 + int(0.8 * 95)
    assert all(lr == 1.0 for lr in lrs[5:stable_end])
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_multiplier(50, 0.9, 5, 0.1, "wsd", cooldown_fraction=0.2) == pytest.approx(0.55)  # halfway down
    assert all(a >= b for a, b in zip(lrs[stable_end:], lrs[stable_end + 1:]))

    # cooldown_fraction 1.0: a linear decay from the peak at the end of warm-up to the floor at the end
    linear = [lr_multiplier(step, (step - 5) / 95, 5, 0.1, "wsd", cooldown_fraction=1.0) for step in range(5, 101)]
    assert linear[0] == pytest.approx(1.0) and linear[-1] == pytest.approx(0.1)
    assert linear[48] == pytest.approx(1.0 - 0.9 * 48 / 95)


def test_cooldown_fraction_outside_its_range_is_refused():
    from lm.errors import LMError
    from lm.modules import LanguageModel

    config = GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(LMError, match=r"cooldown_fraction must be in \(0, 1\]"):
            LanguageModel(config, schedule="wsd", cooldown_fraction=bad)


def test_time_bounded_run_schedules_by_wall_clock():
    """With trainer.max_time and no max_steps, progress is elapsed / budget; with both, the further along."""
    from lightning.pytorch import Trainer

    from lm.modules import LanguageModel

    config = GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
    for max_steps, expected in [(-1, 0.25), (200, 0.5)]:
        module = LanguageModel(config, warmup_steps=0, schedule="wsd")
        trainer = Trainer(max_time="00:00:04:00", max_steps=max_steps, logger=False, enable_checkpointing=False)
        module.trainer = trainer
        timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
        timer.time_elapsed = lambda stage="train": 60.0  # one minute of four
        warmup, progress = module._schedule_progress()
        assert progress(100) == pytest.approx(expected)
    module.trainer = Trainer(max_steps=-1, max_epochs=-1, logger=False)
    with pytest.raises(ValueError, match="max_time"):
        module._schedule_progress()


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, tie_embeddings=False))
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), optimizer="muon")
    muon_params = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    hidden = {id(m.weight) for block in model.layers for m in block.modules() if isinstance(m, torch.nn.Linear)}
    assert muon_params == hidden  # not the embedding, not the untied head, no biases or gains
    adamw_params = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) in adamw_params and id(model.embed_tokens.weight) in adamw_params
    assert len(muon_params) + len(adamw_params) == len(list(model.parameters()))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[1]["lr"] == pytest.approx(5e-3)
    train_and_check_the_state_round_trip(model, optimizer, "muon", scheduler)


def train_and_check_the_state_round_trip(model, optimizer, name: str, scheduler=None) -> None:
    """20 steps on random ids must halve the loss; a fresh optimizer restored from the state dict holds the
    same state, tensor for tensor."""
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    restored = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), optimizer=name)
    restored.load_state_dict(optimizer.state_dict())
    for a, b in [(optimizer.muon, restored.muon), (optimizer.adamw, restored.adamw)]:
        for p in a.state:
            for key, value in a.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.state[p][key]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_fp32_path_is_torchs_update_with_the_iteration_in_fp32(nesterov, monkeypatch):
    """On a CPU without native bf16, lm's Muon runs torch's update with Newton-Schulz in fp32. Forced to
    bf16 through the same code, it matches torch.optim.Muon bit for bit (same update rule); in fp32 it
    stays within bf16 rounding of it; the momentum buffer is never modified by the iteration."""
    from lm.modules import optimizers as optim

    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = {name: [torch.nn.Parameter(p.detach().clone()) for p in params] for name in ("torch", "ours_bf16", "ours_fp32")}
    kwargs = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    optimizers = {"torch": torch.optim.Muon(twins["torch"], **kwargs),
                  "ours_bf16": optim.Muon(twins["ours_bf16"], **kwargs),
                  "ours_fp32": optim.Muon(twins["ours_fp32"], **kwargs)}
    optimizers["ours_bf16"].step = torch.no_grad()(lambda: [optimizers["ours_bf16"]._step_group(g, torch.bfloat16)
                                                            for g in optimizers["ours_bf16"].param_groups])
    monkeypatch.setattr("lm.runtime.hardware.cpu_has_native_bf16", lambda: False)  # the fp32 choice of an AVX2 CPU
    expected_buffers = [torch.zeros(s) for s in shapes]
    for step in range(3):
        grads = [torch.randn(s) for s in shapes]
        expected_buffers = [buf.lerp(g, 1 - 0.95) for buf, g in zip(expected_buffers, grads)]
        for name, optimizer in optimizers.items():
            for p, g in zip(twins[name], grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, c in zip(twins["torch"], twins["ours_bf16"], twins["ours_fp32"]):
        assert torch.equal(a, b)
        assert not torch.equal(a, c) and torch.allclose(a, c, atol=0.02 * 3 * 0.05)
    for p, expected in zip(twins["ours_fp32"], expected_buffers):  # the plain momentum average, untouched
        assert torch.allclose(optimizers["ours_fp32"].state[p]["momentum_buffer"], expected)


def test_muon_picks_bf16_only_where_it_is_fast(monkeypatch):
    from lm.modules import optimizers as optim

    cpu = torch.device("cpu")
    monkeypatch.setattr("lm.runtime.hardware.cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr("lm.model.inference.onednn_bf16_supported", lambda: True)
    assert optim.fast_bf16_matmul(cpu) and optim.fast_bf16_matmul(torch.device("cuda"))
    monkeypatch.setattr("lm.model.inference.onednn_bf16_supported", lambda: False)  # ONEDNN_MAX_CPU_ISA=AVX2
    assert not optim.fast_bf16_matmul(cpu)
    monkeypatch.setattr("lm.model.inference.onednn_bf16_supported", lambda: True)
    monkeypatch.setattr("lm.runtime.hardware.cpu_has_native_bf16", lambda: False)
    assert not optim.fast_bf16_matmul(cpu)


def test_polar_express_orthogonalizes_closer_than_the_quintic_in_as_many_iterations():
    """Polar Express's per-iteration quintics leave a random matrix's singular values nearer 1 after 5
    iterations than Muon's one quintic repeated 5 times (its smallest goes from ~0.7 to ~0.85)."""
    from lm.modules.optimizers import POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_NORM_MARGIN, newton_schulz

    def polar_express(matrix, eps, dtype):
        return newton_schulz(matrix, POLAR_EXPRESS_COEFFICIENTS, eps, dtype, POLAR_EXPRESS_NORM_MARGIN)

    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64)]:
        matrix = torch.randn(shape)
        quintic = torch.linalg.svdvals(newton_schulz(matrix, [(3.4445, -4.7750, 2.0315)] * 5, 1e-7, torch.float32))
        express = torch.linalg.svdvals(polar_express(matrix, 1e-7, torch.float32))
        assert polar_express(matrix, 1e-7, torch.float32).shape == shape
        assert express.min() > quintic.min() + 0.1
        assert 0.8 < express.min() and express.max() < 1.2


def test_gram_iteration_matches_the_plain_iteration_in_float32_with_fewer_flops():
    """Non-square float32 matrices iterate on the Gram matrix: the result is the plain iteration's to ~1e-4 of the
    float64 answer (bf16's plain iteration, torch's default, is ~0.1 off), with fewer FLOPs; square matrices, bf16
    and more than GRAM_ITERATION_MAX_STEPS iterations keep the plain iteration."""
    from lm.modules import optimizers as optim

    def plain(x, coefficients, dtype):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(optim, "uses_gram_iteration", lambda *args: False)
            return optim.newton_schulz(x, coefficients, 1e-7, dtype)

    torch.manual_seed(0)
    quintic = [(3.4445, -4.7750, 2.0315)] * 5
    for shape in [(512, 128), (128, 384)]:
        u = torch.linalg.qr(torch.randn(shape[0], 128))[0]
        v = torch.linalg.qr(torch.randn(shape[1], 128))[0]
        matrix = (u * torch.logspace(0, -4, 128)) @ v.T  # a gradient-like spectrum, from 1 to 1e-4
        assert optim.uses_gram_iteration(shape, 5, torch.float32)
        reference = plain(matrix.double(), quintic, torch.float64)
        gram = optim.newton_schulz(matrix, quintic, 1e-7, torch.float32)
        assert gram.shape == shape and gram.dtype == torch.float32
        assert (gram.double() - reference).norm() / reference.norm() < 1e-3
        assert (plain(matrix, quintic, torch.bfloat16).double() - reference).norm() / reference.norm() > 1e-2
        # the same polynomial: its singular values are the plain iteration's
        torch.testing.assert_close(torch.linalg.svdvals(gram), torch.linalg.svdvals(plain(matrix, quintic, torch.float32)),
                                   rtol=1e-3, atol=1e-3)
        assert optim.newton_schulz_flops(shape, 5, torch.float32) < 0.7 * optim.newton_schulz_flops(shape, 5, torch.bfloat16)
    assert not optim.uses_gram_iteration((256, 256), 5, torch.float32)  # square: no saving
    assert not optim.uses_gram_iteration((1024, 256), 5, torch.bfloat16)  # bf16 loses the small singular values
    assert not optim.uses_gram_iteration((1024, 256), 8, torch.float32)  # rounding grows with the iterations
    assert optim.newton_schulz_flops((256, 256), 5, torch.float32) == 5 * 6 * 256 ** 3


def test_normuon_evens_out_rows_and_keeps_the_updates_norm():
    """NorMuon's row normalization: from a fresh state every row of the result has the same RMS (the
    moment is then a fixed fraction of each row's mean square), and the Frobenius norm is the input's."""
    from lm.modules.optimizers import normalize_rows

    torch.manual_seed(0)
    update = torch.randn(16, 32) * torch.linspace(0.1, 3.0, 16)[:, None]  # rows of very different sizes
    state: dict = {}
    out = normalize_rows(update, state, beta2=0.95)
    row_rms = out.square().mean(dim=1).sqrt()
    assert torch.allclose(row_rms, row_rms.mean().expand_as(row_rms), rtol=1e-4)
    assert out.norm() == pytest.approx(update.norm().item(), rel=1e-5)
    assert state["row_second_moment"].shape == (16, 1)
    second = normalize_rows(update, state, beta2=0.95)  # the moment keeps averaging (no reset)
    assert torch.allclose(state["row_second_moment"], (1 - 0.95 ** 2) * update.square().mean(dim=1, keepdim=True))
    assert torch.allclose(second, out, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["normuon", "muon_polar_express"])
def test_muon_variants_train_and_round_trip_their_state(optimizer, monkeypatch):
    """Both variants run their own update in either Newton-Schulz dtype, train a small GPT and restore."""
    for native_bf16 in (True, False):
        monkeypatch.setattr("lm.modules.optimizers.fast_bf16_matmul", lambda device: native_bf16)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=16))
        built = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), optimizer=optimizer)
        train_and_check_the_state_round_trip(model, built, optimizer)
        states = list(built.muon.state.values())
        assert states and all(("row_second_moment" in s) == (optimizer == "normuon") for s in states)


def test_adamw_lr_ratio_scales_adamws_groups_beside_muon_and_the_schedule_scales_both():
    from lm.errors import LMError
    from lm.modules.language_model import LanguageModel

    model = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          max_position_embeddings=16))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), optimizer="muon", adamw_lr_ratio=1.7)
    assert [g["lr"] for g in optimizer.muon.param_groups] == [1e-3]
    assert [g["lr"] for g in optimizer.adamw.param_groups] == pytest.approx([1.7e-3, 1.7e-3])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == pytest.approx([8.5e-4, 8.5e-4])

    config = GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(LMError, match="every parameter is AdamW's"):
        LanguageModel(config, optimizer="adamw", adamw_lr_ratio=1.7)
    with pytest.raises(LMError, match="adamw_lr_ratio must be positive"):
        LanguageModel(config, optimizer="muon", adamw_lr_ratio=0.0)
    module = LanguageModel(config, optimizer="muon", adamw_lr_ratio=1.7)
    assert module.hparams.adamw_lr_ratio == 1.7  # saved: a checkpoint resumes with the same groups


@pytest.mark.parametrize("optimizer", ["muon", "normuon"])
def test_muon_optimizers_refuse_sharded_training_by_name(optimizer):
    from lm.errors import LMError
    from lm.modules.language_model import LanguageModel

    module = LanguageModel(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
                           optimizer=optimizer)
    module._sharded_run = lambda: True  # what an FSDP strategy makes it
    with pytest.raises(LMError, match=f"optimizer: {optimizer} \\(Muon\\) does not work with sharded training"):
        module.configure_optimizers()
