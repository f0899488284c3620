"""`lm import`: Hugging Face GPT-2 / Llama folders (built here with transformers' own classes, random weights,
tokenizers trained here) become `lm` checkpoints that compute the same logits, export back, train and generate;
SentencePiece-style tokenizers keep exact bytes; what lm cannot compute is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lm.cli.main import main
from lm.data.tokenizer import EOT, Tokenizer
from lm.errors import LMError
from lm.export.hf import export_hf
from lm.io.checkpoints import load_model, read_checkpoint
from lm.io.hf_import import llama_rope_base, load_hf_folder
from tests.conftest import make_corpus

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

CORPUS = make_corpus(20, 3)
# Text the tiny vocabularies have never seen: accents, emoji, tabs, newlines, a run of spaces.
ODD_TEXT = "naïve café ☕ 😀\n\tTabs  and   spaces.\nThe river was built in 1854 ."
TRAINER = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------- building folders
def byte_level_tokenizer(eos: str = EOT, vocab_size: int = 300):
    """A byte-level BPE (GPT-2 / SmolLM / Llama 3 style) trained on the test corpus, as transformers saves it."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos)


def sentencepiece_tokenizer():
    """A Llama 2 / TinyLlama-style tokenizer: <unk> <s> </s>, the 256 <0xNN> byte-fallback pieces, then BPE
    pieces over ▁-spelled text; built by transformers' own LlamaTokenizer (Metaspace, dummy prefix)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=200))
    trained = json.loads(backend.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    return transformers.LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (biases and norm weights too), so a mapping that drops or swaps one shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def gpt2_folder(folder: Path, tokenizer=None, **overrides) -> tuple[Path, torch.nn.Module]:
    tokenizer = tokenizer or byte_level_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                                     **overrides)
    model = randomize(transformers.GPT2LMHeadModel(config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def llama_folder(folder: Path, tokenizer=None, max_shard_size: str | None = None, **overrides):
    tokenizer = tokenizer or byte_level_tokenizer("<|end_of_text|>")
    settings = dict(vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id)
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **overrides})))
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(folder)
    return folder, model


def assert_same_logits(hf_model, model, tokenizer: Tokenizer) -> None:
    """`model` (an lm GPT, or a transformers model read back from an export) gives `hf_model`'s logits."""
    ids = torch.tensor([tokenizer.encode(CORPUS)[:32], tokenizer.encode(ODD_TEXT)[-32:]])
    with torch.no_grad():
        expected, got = hf_model(ids).logits, model(ids)
    got = getattr(got, "logits", got)
    assert expected.shape == got.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_import_computes_the_same_logits(tmp_path, tied):
    folder, hf_model = gpt2_folder(tmp_path / "gpt2", tie_word_embeddings=tied)
    model, tokenizer, notes = load_hf_folder(folder)
    assert model.config.tie_embeddings is tied and model.config.position == "learned" and not notes
    assert_same_logits(hf_model, model, tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode(ODD_TEXT) == hf_tokenizer(ODD_TEXT, add_special_tokens=False).input_ids
    assert tokenizer.eot_id == hf_tokenizer.eos_token_id


LLAMA_VARIANTS = {
    "gqa_untied_attention_bias": dict(num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
                                      rope_theta=500.0),
    "mqa_tied_mlp_bias": dict(num_key_value_heads=1, tie_word_embeddings=True, mlp_bias=True),
    "mha_plain": dict(rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_import_computes_the_same_logits(tmp_path, variant):
    overrides = LLAMA_VARIANTS[variant]
    folder, hf_model = llama_folder(tmp_path / "llama", **overrides)
    model, tokenizer, notes = load_hf_folder(folder)
    config = model.config
    assert config.num_key_value_heads == overrides.get("num_key_value_heads", 4)
    assert config.tie_embeddings is overrides.get("tie_word_embeddings", False)
    assert config.rope_base == overrides.get("rope_theta", 10000.0)
    assert_same_logits(hf_model, model, tokenizer)
    # Llama 3's eos `<|end_of_text|>` is lm's <|endoftext|>, with the same id.
    assert tokenizer.eot_id == hf_model.config.eos_token_id and tokenizer.decode([tokenizer.eot_id]) == EOT
    assert any("<|end_of_text|>" in note for note in notes)


def test_sharded_safetensors_import(tmp_path):
    folder, hf_model = llama_folder(tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    model, tokenizer, _ = load_hf_folder(folder)
    assert_same_logits(hf_model, model, tokenizer)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_then_export_hf_round_trip(tmp_path, arch):
    make = gpt2_folder if arch == "gpt2" else llama_folder
    extra = {} if arch == "gpt2" else LLAMA_VARIANTS["gqa_untied_attention_bias"]
    folder, hf_model = make(tmp_path / "source", **extra)
    model, tokenizer, _ = load_hf_folder(folder)
    exported = export_hf(model, tokenizer, tmp_path / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(again) is type(hf_model)
    assert_same_logits(hf_model, again, tokenizer)


def test_rope_settings_of_transformers_4_and_5():
    assert llama_rope_base({"rope_theta": 500000.0, "rope_scaling": None}) == 500000.0  # 4.x
    assert llama_rope_base({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}) == 100000.0  # 5.x
    assert llama_rope_base({}) == 10000.0
    for scaled in ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                   {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}):
        with pytest.raises(LMError, match="RoPE scaling"):
            llama_rope_base(scaled)
    with pytest.raises(LMError, match="partial_rotary_factor"):
        llama_rope_base({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})


# ------------------------------------------------------------------- SentencePiece-style tokenizers
def check_exact_bytes(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    lengths = tokenizer.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    return ids


def test_sentencepiece_llama_tokenizer_is_exact(tmp_path):
    hf_tokenizer = sentencepiece_tokenizer()
    folder, hf_model = llama_folder(tmp_path / "tinyllama", tokenizer=hf_tokenizer)
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "Metaspace" and spec["model"]["byte_fallback"]
    model, tokenizer, notes = load_hf_folder(folder)
    for text in (ODD_TEXT, CORPUS[:300], " leading space", "", "\n"):
        check_exact_bytes(tokenizer, text)
    # Documents encoded one by one and joined decode to the joined text (no dummy-prefix space per document).
    assert tokenizer.decode(tokenizer.encode("One.") + [tokenizer.eot_id] + tokenizer.encode("Two.")) == f"One.{EOT}Two."
    # SentencePiece sees " " + text: lm encodes exactly that, and it is what transformers encodes for the text.
    text = "The river was built in 1854 . naïve ☕"
    assert tokenizer.encode(" " + text) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.eot_id == 2 and tokenizer.decode([2]) == EOT and any("'</s>'" in note for note in notes)
    assert tokenizer.token_byte_lengths()[3 + 0xE2] == 1 and 2 in tokenizer.special_ids
    assert_same_logits(hf_model, model, tokenizer)


def test_sentencepiece_legacy_normalizer_layout_is_exact():
    """Older conversions (TinyLlama's tokenizer.json) put the dummy prefix in a Prepend normalizer."""
    spec = json.loads(sentencepiece_tokenizer().backend_tokenizer.to_str())
    backend = HFTokenizer.from_str(json.dumps(spec))
    backend.pre_tokenizer = None
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = Tokenizer.from_str(backend.to_str())
    assert check_exact_bytes(tokenizer, ODD_TEXT) == Tokenizer(HFTokenizer.from_str(json.dumps(spec))).encode(ODD_TEXT)
    assert Tokenizer.from_str(tokenizer.to_str()).encode(ODD_TEXT) == tokenizer.encode(ODD_TEXT)  # stored form reloads


def test_sentencepiece_without_byte_fallback_is_refused():
    spec = json.loads(sentencepiece_tokenizer().backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = False
    with pytest.raises(LMError, match="no byte fallback"):
        Tokenizer.from_str(json.dumps(spec))


# ------------------------------------------------------------------------------------- the verb
def test_import_then_fit_generate_and_eval(tmp_path, monkeypatch, capsys, corpus_files):
    monkeypatch.chdir(tmp_path)
    folder, hf_model = gpt2_folder(tmp_path / "hf")
    main(["import", "--hf_folder", str(folder), "--output", "gpt2.ckpt", "--recipe", "gpt2.yaml"])
    assert "Imported" in capsys.readouterr().out
    model, tokenizer = load_model("gpt2.ckpt")
    assert_same_logits(hf_model, model, tokenizer)

    # Continued training from the recipe the import wrote: the architecture and tokenizer fit.
    main(["fit", "--config", "gpt2.yaml", "--experiment", "more", *TRAINER, "--data.batch_size", "4",
          "--data.train_files", f"[{corpus_files['train']}]", "--data.val_files", f"[{corpus_files['valid']}]",
          "--data.cache_dir", str(tmp_path / "cache"), "--model.learning_rate", "1e-3", "--model.warmup_steps", "1"])
    saved = read_checkpoint("checkpoints/more/last.ckpt")
    assert saved["global_step"] == 2 and saved["tokenizer"] == tokenizer.to_str()
    moved = saved["state_dict"]["model.layers.0.attn.qkv_proj.weight"] - model.layers[0].attn.qkv_proj.weight
    assert moved.abs().max() > 0

    capsys.readouterr()
    main(["generate", "--ckpt_path", "gpt2.ckpt", "--prompt", "The river", "--max_new_tokens", "5",
          "--temperature", "0", "--format", "jsonl"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    prompt = tokenizer.encode("The river")
    with torch.no_grad():  # greedy: the first generated token is transformers' argmax after the prompt
        first = hf_model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    assert row["completion"] and tokenizer.encode("The river" + row["completion"])[len(prompt)] == first
    main(["eval", "--ckpt_path", "gpt2.ckpt", "--text_files", f"[{corpus_files['test']}]", "--stride", "16"])
    assert "bpb" in capsys.readouterr().out


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_FOLDERS = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "config.json not found"),
    "unsupported model_type": (lambda f: _edit_config(f, model_type="mistral"), "model_type 'mistral' is not supported"),
    "exact-erf GELU": (lambda f: _edit_config(f, activation_function="gelu"), "activation_function 'gelu'"),
    "layer-scaled attention": (lambda f: _edit_config(f, scale_attn_by_inverse_layer_idx=True),
                               "scale_attn_by_inverse_layer_idx=True"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "has no weights lm reads"),
    "no tokenizer.json": (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "weights of another size": (lambda f: _edit_config(f, n_inner=64), "do not fit config.json"),
}
BAD_LLAMA = {
    "head_dim": (dict(head_dim=16), "head_dim=16 differs"),
    "rope llama3": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "'llama3'"),
    "gelu gate": (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
}


@pytest.fixture(scope="module")
def good_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return gpt2_folder(root / "gpt2")[0], llama_folder(root / "llama")[0]


@pytest.mark.parametrize("case", [*BAD_FOLDERS, *BAD_LLAMA])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, good_folders, case):
    source = good_folders[0] if case in BAD_FOLDERS else good_folders[1]
    folder = Path(shutil.copytree(source, tmp_path / "hf"))
    if case in BAD_FOLDERS:
        BAD_FOLDERS[case][0](folder)
    else:
        _edit_config(folder, **BAD_LLAMA[case][0])
    expected = (BAD_FOLDERS.get(case) or BAD_LLAMA[case])[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf_folder", str(folder), "--output", str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "Traceback" not in err, err
    assert err.startswith("lm import: error:") and len(err.strip().splitlines()) == 2  # + the LM_DEBUG hint
    assert not (tmp_path / "out.ckpt").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys, good_folders):
    output = tmp_path / "out.ckpt"
    output.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        main(["import", "--hf_folder", str(good_folders[0]), "--output", str(output)])
    assert "already exists" in capsys.readouterr().err and output.read_bytes() == b"keep me"
    main(["import", "--hf_folder", str(good_folders[0]), "--output", str(output), "--overwrite", "true",
          "--dtype", "bfloat16"])
    model, _ = load_model(output, dtype=torch.float32)
    assert read_checkpoint(output)["state_dict"]["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert model.embed_tokens.weight.dtype == torch.float32


def test_imported_llama_is_a_finetune_backbone_and_quantizes(tmp_path, monkeypatch, capsys):
    """A SentencePiece-tokenized Llama: instruction tuning takes it as the backbone (its tokenizer, with
    </s> as the end of each response), and `lm quantize` + `lm generate` read it."""
    monkeypatch.chdir(tmp_path)
    folder, _ = llama_folder(tmp_path / "hf", tokenizer=sentencepiece_tokenizer(), max_position_embeddings=256)
    main(["import", "--hf_folder", str(folder), "--output", "llama.ckpt"])
    rows = [{"instruction": "Name the river.", "input": "", "output": "The river was built in 1854 ."}] * 12
    (tmp_path / "alpaca.json").write_text(json.dumps(rows), encoding="utf-8")
    main(["finetune", "fit", "--experiment", "alpaca", "--model", "lm.modules.instruct.InstructionTuner",
          "--model.backbone", "llama.ckpt", "--model.learning_rate", "1e-3", "--data",
          "lm.data.finetuning.instruction_data.InstructionDataModule", "--data.data_file", "alpaca.json",
          "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    tuned = read_checkpoint("checkpoints/alpaca/last.ckpt")
    assert tuned["global_step"] == 2 and tuned["tokenizer"] == read_checkpoint("llama.ckpt")["tokenizer"]
    main(["quantize", "--ckpt_path", "llama.ckpt", "--output", "int8.ckpt"])
    capsys.readouterr()
    main(["generate", "--ckpt_path", "int8.ckpt", "--prompt", " The river", "--max_new_tokens", "4",
          "--temperature", "0", "--format", "jsonl"])
    assert "completion" in json.loads(capsys.readouterr().out.splitlines()[0])


def test_gpt2_hub_layout_pytorch_bin_without_prefix(tmp_path):
    """The `gpt2` repository's layout: GPT2Model names (no `transformer.`), the causal-mask buffers `attn.bias`
    / `attn.masked_bias` saved beside the weights; here as pytorch_model.bin (read with weights_only)."""
    folder, hf_model = gpt2_folder(tmp_path / "gpt2")
    (folder / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    model, tokenizer, _ = load_hf_folder(folder)
    assert_same_logits(hf_model, model, tokenizer)
