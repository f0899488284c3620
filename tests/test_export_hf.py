"""`lm export --format hf`: every GPT variant loads in transformers and computes lm's logits and greedy tokens.

GPT-2 / Llama-shaped models map onto transformers' own classes; every other variant (the default recipe's
included) is written with lm's own code (lm/export/hf_remote_code/) and loads with `trust_remote_code=True`.
Random-weight tiny models (hidden 64, 2 layers, the 300-token vocabulary of a tokenizer trained here), weights
perturbed so no block is the identity. transformers copies remote code into its modules cache: it is pointed at
a temporary folder for the module (and for the fresh-process check), so runs never collide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lm.cli.lightning_cli import parse_recipe
from lm.commands.export import export
from lm.data.tokenizer import Tokenizer
from lm.errors import LMError
from lm.export.hf import REMOTE_CODE_FILES, checkpoint_facts, export_hf, hf_architecture
from lm.io.checkpoints import save_model
from lm.model import GPT, GPTConfig, build_gpt, generate
from lm.model.layers import Block
from tests.conftest import make_corpus
from tests.helpers import REPO_ROOT

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
GPT2_LIKE = dict(TINY, position="learned", norm="layernorm", activation="gelu")
PROMPT, NEW_TOKENS = 8, 16  # prompt + new tokens stay inside the 32-token context


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([make_corpus(20)], vocab_size=300)


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """transformers' copy of remote code goes to a temporary folder (in this process and in subprocesses)."""
    import transformers.dynamic_module_utils as dynamic

    home = tmp_path_factory.mktemp("hf_home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other (and for the machine's other jobs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_MODULES_CACHE", str(home / "modules"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(home / "modules"))
        yield home / "modules"
    torch.set_num_threads(threads)
    if str(home / "modules") in sys.path:
        sys.path.remove(str(home / "modules"))
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


def tiny_gpt(vocab_size: int, seed: int = 0, **fields) -> GPT:
    """A GPT with trained-looking weights: every parameter moved off its init (zero-init projections,
    unit norm gains, zero residual scalars), so each variant's part of the computation shows in the logits."""
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**{"vocab_size": vocab_size, **fields})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p)) if p.dim() > 1 else p.add_(0.2 * torch.randn_like(p))
    return model


def default_recipe_fields() -> dict:
    """experiments/wikitext2_cpu.yaml's model.config at a tiny size (its variant choices kept)."""
    recipe = yaml.safe_load((REPO_ROOT / "experiments" / "wikitext2_cpu.yaml").read_text())
    return {**recipe["model"]["config"], **TINY, "zero_init_residual": False}


def prompt_ids(tokenizer: Tokenizer, rows: int = 2, length: int = 20) -> torch.Tensor:
    ids = tokenizer.encode(make_corpus(2, seed=5))
    return torch.tensor([ids[i * length:(i + 1) * length] for i in range(rows)])


def load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def assert_same_as_lm(model: GPT, folder: Path, tokenizer: Tokenizer) -> None:
    """Logits within 1e-4 (fp32), and greedy tokens equal: pure argmax past the prompt (the KV cache path), and
    `do_sample=False` under the folder's generation_config (lm generate's repetition penalty) = `--temperature 0`."""
    hf = load(folder)
    x = prompt_ids(tokenizer)
    with torch.no_grad():
        plain = model(x, context_cache=False) if model.config.context_cache else model(x)
        assert (hf(x).logits - plain).abs().max().item() < 1e-4
    eot = tokenizer.eot_id
    prompt = x[:, :PROMPT]
    ours = generate(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0, eos_id=eot)
    theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    assert theirs.tolist() == ours.tolist()
    ours = generate(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0, eos_id=eot)
    assert hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == ours.tolist()


# ------------------------------------------------------------------------------------------------ variants
SINGLE_OPTIONS = {
    "sinusoidal": dict(position="sinusoidal"), "rope": dict(position="rope"), "rope_base": dict(position="rope", rope_base=500.0),
    "rmsnorm": dict(norm="rmsnorm"), "norm_eps": dict(norm_eps=1e-2), "relu2": dict(activation="relu2"),
    "swiglu": dict(activation="swiglu"), "intermediate_size": dict(intermediate_size=96), "qk_norm": dict(qk_norm=True),
    "gqa": dict(num_key_value_heads=2), "mqa": dict(num_key_value_heads=1), "logit_softcap": dict(logit_softcap=3.0),
    "residual_scalars": dict(residual_scalars=True), "no_bias": dict(bias=False), "untied": dict(tie_embeddings=False),
    "value_embeddings": dict(value_embeddings=1),  # 2 layers: both read table 0
    "value_embeddings_gqa_3_layers": dict(value_embeddings=2, num_key_value_heads=2, num_hidden_layers=3),  # middle: 2 tables
    "bigram_embedding": dict(bigram_embedding=64), "smear": dict(smear=True),
    "dropouts": dict(dropout=0.2, attention_dropout=0.1, embedding_dropout=0.1), "math_attention": dict(attention="math"),
    "context_cache": dict(context_cache=True),
}


@pytest.mark.parametrize("option", SINGLE_OPTIONS, ids=list(SINGLE_OPTIONS))
def test_each_option_through_lm_own_code(tokenizer, tmp_path, option):
    model = tiny_gpt(tokenizer.vocab_size, **{**GPT2_LIKE, **SINGLE_OPTIONS[option]})
    folder = export_hf(model, tokenizer, tmp_path / "hf", native=False)
    assert type(load(folder)).__name__ == "LMForCausalLM"
    assert_same_as_lm(model, folder, tokenizer)


def test_the_default_recipe_exports_through_lm_own_code(tokenizer, tmp_path):
    fields = default_recipe_fields()
    assert fields["position"] == "rope" and fields["qk_norm"] and fields["activation"] == "relu2" and fields["context_cache"]
    model = tiny_gpt(tokenizer.vocab_size, **fields)
    assert hf_architecture(model.config) == "lm_gpt"
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "lm_gpt" and config["architectures"] == ["LMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lm.LMForCausalLM" and config["context_cache"] is False
    assert {*REMOTE_CODE_FILES, "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= {p.name for p in folder.iterdir()}
    assert_same_as_lm(model, folder, tokenizer)
    base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    x = prompt_ids(tokenizer)
    with torch.no_grad():
        assert (base(x).last_hidden_state - model(x, return_hidden=True, context_cache=False)).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["default_recipe", "previous_token_levers"])
def test_a_left_padded_batch_generates_each_row_as_alone(tokenizer, tmp_path, case):
    """previous_token_levers: bigram_embedding and smear read the token before each position, across generate's
    steps (the previous token comes from the full ids) and with left padding (a row's first real token has none,
    not the pad)."""
    if case == "default_recipe":
        model = tiny_gpt(tokenizer.vocab_size, **default_recipe_fields())
        folder = export_hf(model, tokenizer, tmp_path / "hf")
    else:
        model = tiny_gpt(tokenizer.vocab_size, **{**GPT2_LIKE, "bigram_embedding": 64, "smear": True})
        folder = export_hf(model, tokenizer, tmp_path / "hf", native=False)
    hf, hf_tokenizer = load(folder), transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    texts = ["The river", "A town in the north of the"]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    out = hf.generate(**batch, max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    ours = generate(model, [tokenizer.encode(t) for t in texts], max_new_tokens=10, temperature=0,
                    repetition_penalty=1.0)
    width = batch["input_ids"].shape[1]
    assert [row[width:] for row in out.tolist()] == [row[len(tokenizer.encode(t)):] for row, t in zip(ours, texts)]


@pytest.mark.parametrize("variant", sorted(p.name for p in (REPO_ROOT / "experiments" / "variants").glob("*.yaml")))
def test_every_preset_on_the_base_recipe_exports_without_custom_code(tokenizer, tmp_path, variant):
    """A preset overlay on the CPU recipe is a native transformers architecture (GPT-2, Llama): no custom code."""
    recipe = parse_recipe(["--config", str(REPO_ROOT / "experiments" / "wikitext2_cpu.yaml"),
                           "--config", str(REPO_ROOT / "experiments" / "variants" / variant)])
    fields = {k: v for k, v in dict(recipe.model.init_args.config).items() if v is not None}
    fields.update(TINY, zero_init_residual=False)
    fields.pop("vocab_size", None)
    model = tiny_gpt(tokenizer.vocab_size, **fields)
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    architecture = {"gpt2.yaml": "GPT2LMHeadModel", "llama.yaml": "LlamaForCausalLM"}[variant]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    assert not any((folder / name).exists() for name in REMOTE_CODE_FILES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code needed
    assert type(hf).__name__ == architecture
    assert_same_as_lm(model, folder, tokenizer)
    # ...and the same model through lm's own code computes the same
    assert_same_as_lm(model, export_hf(model, tokenizer, tmp_path / "own", native=False), tokenizer)


# --------------------------------------------------------------------------------- the verb, the card
def lightning_like_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """What `lm fit` saves, to the parts the model card reads: the checkpoint callback's best score, the step,
    the data module's training files, the optimizer."""
    save_model(path, model, tokenizer)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"].update(optimizer="muon", learning_rate=1.5e-3, schedule="wsd", weight_decay=2.0)
    checkpoint.update(global_step=40, epoch=1, datamodule_hyper_parameters={"train_files": ["wiki.valid.raw"],
                                                                            "vocab_size": 300, "tokenizer_kind": "bpe"})
    checkpoint["callbacks"] = {"LastStepCheckpoint{'monitor': 'val/loss'}": {
        "dirpath": str(path.parent / "checkpoints" / "tiny-recipe"), "monitor": "val/loss",
        "best_model_score": torch.tensor(5.4321), "best_model_path": "step000040-val_loss5.4321.ckpt"}}
    torch.save(checkpoint, path)
    return path


def test_lm_export_of_a_checkpoint_with_a_context_cache(tokenizer, tmp_path, capsys):
    model = tiny_gpt(tokenizer.vocab_size, **default_recipe_fields())
    model.context_cache.weight.fill_(0.4)  # a calibrated cache: the mixture differs from the softmax
    model.context_cache.temperature.fill_(1.2)
    ckpt = lightning_like_checkpoint(tmp_path / "run.ckpt", model, tokenizer)
    export(ckpt_path=str(ckpt), output=str(tmp_path / "hf"), format="hf")
    assert "context cache" in capsys.readouterr().out  # said when it is dropped
    x = prompt_ids(tokenizer)
    with torch.no_grad():
        mixture, plain = model(x, context_cache=True), model(x, context_cache=False)
        assert (mixture.softmax(-1) - plain.softmax(-1)).abs().max() > 1e-3
    assert_same_as_lm(model, tmp_path / "hf", tokenizer)  # the plain softmax, not the mixture
    card = (tmp_path / "hf" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "custom_code" in meta["tags"] and meta["license"] == "other"
    for fact in ("tiny-recipe", "5.4321", "40 optimizer steps", "wiki.valid.raw", "muon", "trust_remote_code=True",
                 "context cache", "| qk_norm | True |", "| position | rope |"):
        assert fact in body, fact
    with pytest.raises(LMError, match="transformers has no context cache"):
        export(ckpt_path=str(ckpt), output=str(tmp_path / "hf2"), format="hf", context_cache=True)


def test_the_folder_loads_in_a_fresh_process(tokenizer, tmp_path, modules_cache):
    """A user's process: nothing of lm imported, AutoModelForCausalLM with trust_remote_code, AutoTokenizer as is."""
    model = tiny_gpt(tokenizer.vocab_size, **default_recipe_fields())
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    text = make_corpus(1, seed=5)[:30]
    code = textwrap.dedent(f"""
        import json, sys, torch, transformers
        folder = {str(folder)!r}
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # transformers 5 asks first (stdin closed: no)
        ids = tokenizer({text!r}, return_tensors="pt").input_ids
        out = model.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
        print("RESULT", json.dumps({{"ids": ids[0].tolist(), "logits": model(ids).logits[0, -1].tolist(), "generated": out[0].tolist(),
                          "lm_loaded": any(m == "lm" or m.startswith("lm.") for m in sys.modules)}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(modules_cache.parent), "HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT " in result.stdout, result.stderr[-3000:]
    seen = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert seen["ids"] == tokenizer.encode(text) and not seen["lm_loaded"]
    with torch.no_grad():
        logits = model(torch.tensor([seen["ids"]]), context_cache=False)[0, -1]
    assert (torch.tensor(seen["logits"]) - logits).abs().max() < 1e-4
    ours = generate(model, torch.tensor([seen["ids"][:8]]), max_new_tokens=12, temperature=0, eos_id=tokenizer.eot_id)
    assert seen["generated"] == ours[0].tolist()


def test_checkpoint_facts_of_a_weights_only_checkpoint(tokenizer, tmp_path):
    """An `lm prune` / `lm merge` output records no run: the card says so instead of inventing one."""
    path = save_model(tmp_path / "exp" / "pruned.ckpt", tiny_gpt(tokenizer.vocab_size, **GPT2_LIKE), tokenizer)
    facts = checkpoint_facts(torch.load(path, weights_only=True), path)
    assert facts == {"checkpoint": "pruned.ckpt", "experiment": "exp"}


class GatedBlock(Block):
    """A researcher's block with a parameter lm's exported code does not know."""

    def __init__(self, config, layer_idx=0, attention_class=None):
        super().__init__(config, layer_idx)
        self.gate = torch.nn.Parameter(torch.ones(()))


def test_a_network_with_custom_blocks_is_refused(tokenizer, tmp_path):
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **GPT2_LIKE), block_class=GatedBlock)
    with pytest.raises(LMError, match="GatedBlock.*--format safetensors"):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
