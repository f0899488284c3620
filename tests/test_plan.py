"""`lm plan`: counts come from the model itself, sharding divides the sharded parts, the fit advice,
device kinds, the CLI end to end, and the plan against a real `lm fit` run's memory."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lm.cli.main import main
from lm.errors import LMError
from lm.commands.plan import prepare_args
from lm.plan import make_plan
from lm.plan.advice import needed_bytes
from lm.plan.devices import GIB, device_spec, known_device_kinds
from lm.plan.estimate import PRECISIONS, memory_per_device
from lm.plan.recipe import read_recipe
from tests.helpers import saved_bytes

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = str(ROOT / "experiments" / "wikitext2_cpu.yaml")
GPT2_SMALL = str(ROOT / "experiments" / "wikitext2_gpt2_small.yaml")
TINY = ["--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "2",
        "--model.config.num_attention_heads", "4", "--data.vocab_size", "512"]


@pytest.fixture(scope="module")
def gpt2_small():
    return read_recipe(["--config", GPT2_SMALL], devices=8)


@pytest.mark.parametrize("overlay", [[], ["--config", str(ROOT / "experiments" / "variants" / "llama.yaml")]])
def test_param_and_flop_counts_equal_the_models_own(overlay):
    from lm.model import GPT, GPTConfig

    import yaml

    base = yaml.safe_load(Path(CPU_RECIPE).read_text())  # what the recipe sets beyond TINY
    context, data = base["model"]["config"]["max_position_embeddings"], base["data"]
    recipe = read_recipe(["--config", CPU_RECIPE, *overlay, *TINY])
    variant = {k: base["model"]["config"][k] for k in ("dropout", "position", "qk_norm", "activation", "norm", "bias")
               if k in base["model"]["config"]}
    if overlay:
        variant.update(position="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False,
                       num_key_value_heads=2, qk_norm=False)
    config = GPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=context, **variant)
    model = GPT(config)
    assert recipe.model.parameters == model.num_parameters()
    assert recipe.model.non_embedding_parameters == model.num_parameters(exclude_embeddings=True)
    assert recipe.model.flops_per_token == model.flops_per_token(context)  # windows of the context (linked)
    assert recipe.model.sequence_length == context
    assert recipe.model.kv_size == (32 if overlay else 64)
    assert recipe.setup.micro_batch == data["batch_size"] and recipe.setup.strategy == "single"


def test_muon_optimizer_flops_are_its_newton_schulz_iterations_and_count_in_the_step():
    """The CPU recipe's Muon runs Newton-Schulz on every hidden matrix each step: the plan counts those
    FLOPs (5 iterations of 4a^2 b + 2a^3 per a x b matrix) in the compute time; AdamW adds none."""
    from lm.plan.estimate import speed

    muon = read_recipe(["--config", CPU_RECIPE, *TINY, "--model.optimizer", "muon"])
    adamw = read_recipe(["--config", CPU_RECIPE, *TINY, "--model.optimizer", "adamw"])
    h, inter, layers = 64, muon.model.intermediate_size, 2
    per_block = [(3 * h, h), (h, h), (inter, h), (h, inter)]  # qkv, o, up, down
    expected = layers * sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in per_block)
    assert muon.model.optimizer_flops == expected and adamw.model.optimizer_flops == 0
    cpu = device_spec("cpu", 1, compute_dtype=PRECISIONS[muon.setup.precision].compute_dtype, peak_flops=1e10)
    gained = speed(muon.model, muon.setup, cpu, 0.5).compute_seconds - speed(adamw.model, adamw.setup, cpu, 0.5).compute_seconds
    assert gained == pytest.approx(expected / (0.5 * 1e10))


@pytest.mark.parametrize("overlay", ["ddp.yaml", "fsdp2_cpu.yaml"])
def test_cpu_collectives_add_to_the_step_and_gpu_ones_overlap(overlay):
    """gloo's collectives run on the cores that compute: on a CPU the plan adds their time (bytes /
    bandwidth + a latency per collective) to the compute; on GPUs a step takes the longer of the two."""
    from lm.plan.estimate import collectives_per_step, communication_bytes, speed

    recipe = read_recipe(["--config", CPU_RECIPE, "--config", str(ROOT / "experiments/trainer" / overlay)], devices=2)
    m, s = recipe.model, recipe.setup
    cpu = device_spec("cpu", 2, compute_dtype=PRECISIONS[s.precision].compute_dtype, peak_flops=1e11)
    assert not cpu.overlaps_communication and cpu.intra_node_bandwidth and cpu.collective_latency > 0
    calls = collectives_per_step(m, s)
    assert calls == (3 * (m.num_layers + 1) if s.strategy == "fsdp2" else math.ceil(m.parameters * 4 / 2**20 / 25))
    plan = speed(m, s, cpu, 0.3)
    comm = communication_bytes(m, s) / cpu.intra_node_bandwidth + calls * cpu.collective_latency
    assert plan.communication_seconds == pytest.approx(comm)
    assert plan.step_seconds == pytest.approx(plan.compute_seconds + comm)
    gpu = replace(cpu, overlaps_communication=True)
    assert speed(m, s, gpu, 0.3).step_seconds == pytest.approx(max(plan.compute_seconds, comm))


def test_overlays_and_overrides_merge_as_in_lm_fit():
    recipe = read_recipe(["--config", GPT2_SMALL, "--config", str(ROOT / "experiments/trainer/fsdp.yaml"),
                          "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2"], devices=8, nodes=2)
    s = recipe.setup
    assert (s.strategy, s.sharding, s.activation_checkpointing) == ("fsdp", "FULL_SHARD", True)
    assert (s.micro_batch, s.accumulation, s.world_size, s.precision) == (4, 2, 16, "bf16-mixed")
    assert recipe.model.vocab_size == 32768  # data.vocab_size linked to the model, as in lm fit


def test_sharded_memory_scales_as_one_over_world_size(gpt2_small):
    model, base = gpt2_small.model, gpt2_small.setup
    sharded = ("weights", "gradients", "optimizer state")
    for strategy in ("fsdp", "fsdp2"):
        one = memory_per_device(model, replace(base, strategy=strategy, devices=1))
        for world in (2, 4, 8, 64):
            many = memory_per_device(model, replace(base, strategy=strategy, devices=world))
            for item in sharded:
                assert many[item] == pytest.approx(one[item] / world)
            assert many["activations"] == one["activations"]  # per micro-batch: not sharded
            assert many["temporary logits"] == one["temporary logits"]
    ddp1 = memory_per_device(model, replace(base, strategy="ddp", devices=1))
    ddp8 = memory_per_device(model, replace(base, strategy="ddp", devices=8))
    assert all(ddp8[item] == ddp1[item] for item in sharded)  # replicated
    zero2 = memory_per_device(model, replace(base, strategy="fsdp", sharding="SHARD_GRAD_OP", devices=8))
    assert zero2["weights"] == ddp8["weights"] and zero2["optimizer state"] == pytest.approx(ddp8["optimizer state"] / 8)


def test_precision_and_checkpointing_change_the_items_they_should(gpt2_small):
    model, base = gpt2_small.model, gpt2_small.setup
    mixed = memory_per_device(model, base)
    true16 = memory_per_device(model, replace(base, precision="bf16-true"))
    full = memory_per_device(model, replace(base, precision="32-true"))
    assert mixed["weights"] == full["weights"] == 2 * true16["weights"] == 4 * model.parameters
    assert mixed["optimizer state"] == 8 * model.parameters  # AdamW: two fp32 values per parameter
    assert full["activations"] > mixed["activations"] > true16["activations"]
    checkpointed = memory_per_device(model, replace(base, activation_checkpointing=True))
    assert checkpointed["activations"] < mixed["activations"] / 3


def _tiny_gpt_and_shape(variant: dict):
    from lm.model import GPT, GPTConfig
    from lm.plan.recipe import ModelShape

    model = GPT(GPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=32, **variant)).train()
    c = model.config
    shape = ModelShape(parameters=0, non_embedding_parameters=0, flops_per_token=0, sequence_length=32,
                       vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       kv_size=c.num_key_value_heads * c.head_dim, intermediate_size=c.intermediate_size,
                       activation=c.activation, attention=c.attention, position=c.position, qk_norm=c.qk_norm,
                       dropout=c.dropout, attention_dropout=c.attention_dropout, largest_unit_parameters=0,
                       residual_scalars=c.residual_scalars, norm=c.norm)
    return model, shape


# The default recipe's block (experiments/wikitext2_cpu.yaml): RoPE, QK-norm, relu2, residual dropout only.
DEFAULT_BLOCK = {"position": "rope", "qk_norm": True, "activation": "relu2", "dropout": 0.2, "attention_dropout": 0.0,
                 "embedding_dropout": 0.1}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("variant", [{}, {"dropout": 0.1}, {"attention": "math"}, DEFAULT_BLOCK,
                                     {"position": "rope"}, {"qk_norm": True}, {"norm": "rmsnorm"},
                                     {"activation": "swiglu", "position": "rope", "norm": "rmsnorm",
                                      "num_key_value_heads": 2, "qk_norm": True}, {"residual_scalars": True}])
def test_activation_formula_matches_what_autograd_saves_on_cpu(variant, precision):
    """32-true; bf16-mixed as CPU autocast runs it (its copies of the weights are the plan's "bf16 weight
    copies", not activations); bf16-true with bf16 weights."""
    import torch

    from lm.plan.estimate import PRECISIONS, activation_bytes_per_token

    torch.manual_seed(0)
    model, shape = _tiny_gpt_and_shape(variant)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    measured, _ = saved_bytes(model, torch.randint(0, 256, (4, 32)), bf16=precision == "bf16-mixed")
    planned = 4 * 32 * activation_bytes_per_token(shape, PRECISIONS[precision], cpu=True, micro_batch=4)
    assert planned == pytest.approx(measured, rel=0.02)  # each variant is within 0.5% (CPU, torch 2.13)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autocast_keeps_the_weight_copies_the_plan_counts(checkpointing):
    """Under bf16 autocast every linear weight's bf16 copy is saved for the backward pass; a checkpointed block
    saves none (autocast's cache of them empties when the forward's autocast region ends), the head's stays."""
    import torch

    from lm.model.layers import Block

    torch.manual_seed(0)
    model, _ = _tiny_gpt_and_shape(DEFAULT_BLOCK)
    model.activation_checkpointing = checkpointing
    _, casts = saved_bytes(model, torch.randint(0, 256, (4, 32)), bf16=True)
    in_blocks = sum(p.numel() for m in model.modules() if isinstance(m, Block) for p in m.parameters())
    planned_parameters = model.num_parameters() - (in_blocks if checkpointing else 0)
    assert casts == pytest.approx(2 * planned_parameters, rel=0.05)
    recipe = read_recipe(["--config", CPU_RECIPE, "--trainer.precision", "bf16-mixed",
                          "--model.activation_checkpointing", str(checkpointing).lower()], devices=1)
    m = recipe.model
    assert memory_per_device(m, recipe.setup)["bf16 weight copies"] == \
        2 * (m.parameters - (m.block_parameters if checkpointing else 0))


def test_recipe_that_cannot_fit_gets_the_message_and_the_smallest_change(capsys):
    main(["plan", "--config", GPT2_SMALL, "--devices", "1", "--device-kind", "l4", "--data.batch_size", "64"])
    out = capsys.readouterr().out
    assert "does not fit: needs " in out and " GiB per device, has 21.6 GiB" in out
    assert "smallest change that fits" in out and "--data.batch_size 16 --trainer.accumulate_grad_batches 16" in out
    # The suggested change really fits, and the one before it (micro-batch 32) does not.
    recipe = read_recipe(["--config", GPT2_SMALL, "--data.batch_size", "64"], devices=1)
    usable = device_spec("l4").memory_bytes * 0.9
    assert needed_bytes(recipe.model, replace(recipe.setup, micro_batch=16, accumulation=16)) <= usable
    assert needed_bytes(recipe.model, replace(recipe.setup, micro_batch=32, accumulation=8)) > usable


def test_a_model_too_big_for_the_node_is_sent_to_fsdp_over_more_nodes():
    plan = make_plan(["--config", GPT2_SMALL, "--model.config.hidden_size", "8192", "--model.config.num_hidden_layers",
                      "48", "--model.config.num_attention_heads", "64", "--data.batch_size", "1"],
                     device_kind="h100", devices=8, nodes=1)
    assert not plan.fits and plan.change is not None
    assert plan.change.setup.strategy == "fsdp" and plan.change.setup.nodes > 1
    assert "--trainer.num_nodes" in plan.change.description


def test_precision_null_is_planned_as_lm_fit_runs_it(monkeypatch):
    """`precision: null` (the CPU recipe's): on `cpu` the plan follows lm fit's choice for this machine."""
    from lm.runtime import hardware
    from lm.plan.estimate import PRECISIONS

    for native, expected in [(True, "bf16-mixed"), (False, "32-true")]:
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert hardware.auto_precision("cpu")[0] == expected
        plan = make_plan(["--config", CPU_RECIPE], device_kind="cpu", peak_flops=1e11, mfu=0.5)
        assert plan.recipe.setup.precision == expected
        assert plan.speed.peak_flops == 1e11 and PRECISIONS[expected].compute_dtype in plan.device.peak_flops
    assert make_plan(["--config", CPU_RECIPE], device_kind="h100", devices=1).recipe.setup.precision == "bf16-mixed"


def test_unknown_device_kind_lists_the_known_ones(capsys):
    assert {"h100", "a100", "l4", "cpu"} <= set(known_device_kinds())
    with pytest.raises(LMError, match="Unknown device kind 'tpu'.*a100, cpu, h100, l4"):
        device_spec("tpu")
    with pytest.raises(SystemExit):
        main(["plan", "--config", CPU_RECIPE, "--device_kind", "tpu"])
    assert "known kinds are a100, cpu, h100, l4" in capsys.readouterr().err


def test_cli_plans_a_recipe_end_to_end(capsys):
    main(["plan", "--config", GPT2_SMALL, "--devices", "8", "--device-kind", "h100", "--tokens", "1e9"])
    out = capsys.readouterr().out
    assert "16 x 1024 x 4 accumulation x 8 devices = 524,288" in out
    assert "DDP (replicated), bf16-mixed" in out and "fits" in out
    assert "gradient all-reduce" in out and "wall time" in out and "1,908 steps" in out  # ceil(1e9 / 524288)
    assert "https://www.nvidia.com/en-us/data-center/h100/" in out


def test_prepare_args_splits_the_verbs_flags_from_the_recipe():
    own = prepare_args(["--config", "a.yaml", "--device-kind", "a100", "--trainer.devices", "2", "--devices=4",
                        "--config", "b.yaml", "--model.config.hidden_size=128", "--model.config.rope_base", "-1",
                        "--headroom", "0.2"])
    assert own[:5] == ["--device_kind", "a100", "--devices=4", "--headroom", "0.2"]
    assert own[5] == "--recipe" and json.loads(own[6]) == [
        "--config", "a.yaml", "--trainer.devices", "2", "--config", "b.yaml", "--model.config.hidden_size=128",
        "--model.config.rope_base", "-1"]


def test_cpu_device_memory_is_the_hosts_split_among_processes():
    one, two = device_spec("cpu", 1, peak_flops=1e9), device_spec("cpu", 2, peak_flops=1e9)
    assert one.memory_bytes == pytest.approx(2 * two.memory_bytes) and one.memory_bytes > GIB
    assert one.peak("float32") == 1e9 and one.measured == ("memory",)


def test_plan_matches_the_measured_model_and_optimizer_memory_of_a_real_run(tmp_path, corpus_files):
    """Two real `lm fit` runs (1 process) that differ only in model size: the growth of the resident
    memory after an optimizer step matches the plan's weights + gradients + AdamW state within 15%."""
    from lm.plan.probe import measure_fit, prepare_data

    def args(hidden: str, layers: str) -> list[str]:
        return ["--config", CPU_RECIPE, "--model.config.hidden_size", hidden, "--model.config.num_hidden_layers", layers,
                "--model.config.num_attention_heads", "4",
                "--model.config.max_position_embeddings", "32", "--model.config.dropout", "0.0",
                "--data.train_files", f"[{corpus_files['train']}]", "--data.vocab_size", "4096",
                "--data.batch_size", "2", "--data.cache_dir", str(tmp_path / "cache"),
                "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
                "false", "--trainer.enable_model_summary", "false", "--trainer.devices", "1"]

    part = ("weights", "gradients", "optimizer state", "averaged weights")  # the recipe keeps an EMA of the weights
    planned, measured = [], []
    prepare_data(args("256", "2"))
    for name, size in {"big": ("256", "2"), "small": ("32", "1")}.items():
        plan = make_plan(args(*size), device_kind="cpu", peak_flops=1e10, probe_steps=0)  # memory only: no speed probe
        planned.append(sum(plan.memory[item] for item in part))
        measured.append(measure_fit(args(*size), tmp_path / name)[0]["model_rss"])
    growth_planned, growth_measured = planned[0] - planned[1], measured[0] - measured[1]
    assert growth_planned > 30 * 2**20  # the difference is large next to page-size noise
    assert growth_measured == pytest.approx(growth_planned, rel=0.15)


def test_measure_gloo_gives_a_latency_and_a_bandwidth():
    """The probe behind the cpu entry's gloo figures: two real gloo processes on this machine."""
    from lm.plan.probe import measure_gloo

    result = measure_gloo(sizes=(1, 1 << 18, 1 << 20))
    assert 0 < result["idle_latency"] < 0.5 and 0 < result["collective_latency"] < 0.5
    assert 1e6 < result["bandwidth"] < 1e12  # bytes/s: between 1 MB/s and 1 TB/s


def test_measured_link_figures_override_the_table():
    """plan_check plans with the gloo figures it measured on the machine: they replace devices.yaml's."""
    args = ["--config", CPU_RECIPE, "--config", str(ROOT / "experiments/trainer/fsdp2_cpu.yaml")]
    table = make_plan(args, device_kind="cpu", devices=2, peak_flops=1e11, mfu=0.4)
    measured = make_plan(args, device_kind="cpu", devices=2, peak_flops=1e11, mfu=0.4,
                         intra_node_bandwidth=table.device.intra_node_bandwidth / 2, collective_latency=0.01)
    assert measured.device.collective_latency == 0.01
    volume, calls = table.speed.communication_bytes, 3 * (table.recipe.model.num_layers + 1)
    assert measured.speed.communication_seconds == pytest.approx(
        volume / (table.device.intra_node_bandwidth / 2) + calls * 0.01)
    assert measured.speed.step_seconds - table.speed.step_seconds == pytest.approx(
        measured.speed.communication_seconds - table.speed.communication_seconds)
    with pytest.raises(LMError, match="collective_latency"):
        make_plan(args, device_kind="cpu", devices=2, peak_flops=1e11, collective_latency=-1.0)


# A model where compute, not Lightning's per-step bookkeeping, dominates a step, yet a step takes ~10-30 ms.
PROBED = ["--config", CPU_RECIPE, "--model.config.hidden_size", "128", "--model.config.num_hidden_layers", "2",
          "--model.config.num_attention_heads", "4", "--model.config.max_position_embeddings", "128",
          "--data.vocab_size", "512", "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "3",
          "--trainer.precision", "32-true"]


def _direct_step_seconds(recipe_args: list[str], steps: int = 6) -> float:
    """Median time of an optimizer step of the recipe's module in a plain loop, no Lightning: 3 accumulated
    micro-batches (forward, loss, backward), gradient clipping, the optimizer (Muon + AdamW), the LR scheduler."""
    import statistics
    import time

    import torch

    from lm.cli.lightning_cli import parse_recipe
    from lm.modules import LanguageModel
    from lm.modules.optimizers import build_optimizer

    module = LanguageModel(**parse_recipe(recipe_args).model.init_args.as_dict())
    hp = module.hparams
    optimizer = build_optimizer(module.model, hp.learning_rate, hp.weight_decay, tuple(hp.betas), optimizer=hp.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    tokens = torch.randint(0, 512, (4, 129))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        for _ in range(3):
            loss = module.compute_loss(module(tokens[:, :-1]), tokens[:, 1:]) / 3
            loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def test_cpu_plan_times_the_recipes_own_training_step(monkeypatch):
    """On cpu without --mfu the plan's speed comes from a probe of the recipe's training step (Lightning's loop,
    3 accumulated micro-batches per optimizer step here): the planned step is the probe's median step, and
    that is within 2x of the same step timed directly in a plain loop (a probe that timed micro-batches,
    the warm-up, or nothing would fall outside). One thread each, so another job on the machine slows both alike."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = _direct_step_seconds(PROBED)
        plan = make_plan(PROBED, device_kind="cpu", peak_flops=1e10, probe_steps=5)
        after = _direct_step_seconds(PROBED)
    finally:
        torch.set_num_threads(saved)
    probe = plan.probe
    assert plan.mfu_source == "probe" and probe is not None and probe.steps == 5 and probe.threads == 1
    assert probe.precision == "32-true" and probe.callbacks == ("ExponentialMovingAverage",)  # the recipe's EMA ran
    assert plan.speed.step_seconds == pytest.approx(probe.step_seconds)  # one process: the probed step is the plan's
    assert plan.speed.tokens_per_second == pytest.approx(4 * 128 * 3 / probe.step_seconds)
    flops = 4 * 128 * 3 * plan.recipe.model.flops_per_token + plan.recipe.model.optimizer_flops
    assert plan.speed.mfu == pytest.approx(flops / (probe.step_seconds * 1e10))
    direct = (before + after) / 2
    assert 0.5 * direct < probe.step_seconds < 2.0 * direct, (probe.step_times, before, after)


def test_probe_opt_outs_and_the_printed_source(capsys, monkeypatch):
    """--mfu and --probe_steps 0 plan without a probe; the output says where the MFU came from; a multi-process
    recipe is probed as one of its processes (the threads each gets) and the MFU applied per device."""
    given = make_plan(PROBED, device_kind="cpu", peak_flops=1e10, mfu=0.3)
    assert (given.mfu_source, given.probe, given.speed.mfu) == ("given", None, 0.3)
    table = make_plan(PROBED, device_kind="cpu", peak_flops=1e10, probe_steps=0)
    assert table.mfu_source == "assumed" and table.speed.mfu == table.device.default_mfu and table.probe is None
    assert "--probe_steps 0" in table.probe_note
    with pytest.raises(LMError, match="probe_steps"):
        make_plan(PROBED, device_kind="cpu", peak_flops=1e10, probe_steps=-1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["plan", *PROBED, "--device_kind", "cpu", "--probe_steps", "3", "--peak_flops", "1e10",
          "--config", str(ROOT / "experiments/trainer/ddp.yaml")])
    out = capsys.readouterr().out
    assert "MFU measured by a 3-step probe" in out and "applied per device" in out and "DDP" in out
    main(["plan", *PROBED, "--device_kind", "cpu", "--probe_steps", "0", "--peak_flops", "1e10"])
    assert "assumed MFU       80%" in capsys.readouterr().out


def test_probe_is_skipped_for_a_recipe_too_big_to_time():
    from lm.plan.speed_probe import skip_reason

    assert skip_reason(0.5, fits=True) is None
    assert "30 s" in skip_reason(6.0, fits=True)  # 6 steps (3 warm-up + 3 timed) of 6 s
    assert "memory" in skip_reason(0.5, fits=False)
    big = make_plan(["--config", CPU_RECIPE, "--model.config.hidden_size", "4096", "--model.config.num_hidden_layers",
                     "32", "--model.config.num_attention_heads", "32"], device_kind="cpu", peak_flops=1e11)
    assert big.mfu_source == "assumed" and big.probe is None and big.probe_note.startswith("probe skipped")


def test_logged_tokens_per_second_is_the_median_over_log_intervals_without_validation(tmp_path):
    """The figure plan_check compares the plan with: lm fit's TensorBoard points, 10 steps of 2048 tokens apart."""
    from torch.utils.tensorboard import SummaryWriter

    from lm.plan.probe import logged_tokens_per_second

    writer = SummaryWriter(str(tmp_path))
    times = [100.0, 110.0, 120.0, 135.0, 145.0, 155.0]  # 10 s per 10 steps, but validation runs within the 3rd
    for i, wall in enumerate(times):
        writer.add_scalar("train/loss", 5.0, 10 * i + 9, walltime=wall)
        writer.add_scalar("train/tokens_per_step", 2048.0, 10 * i + 9, walltime=wall)
    writer.add_scalar("val/loss", 5.0, 29, walltime=130.0)
    writer.close()
    result = logged_tokens_per_second(tmp_path)
    assert result["intervals"] == pytest.approx([2048.0] * 4)  # 10 x 2048 tokens in 10 s; the 15 s one left out
    assert result["tokens_per_second"] == pytest.approx(2048.0)
