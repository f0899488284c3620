"""`lm import`: a local Hugging Face model folder (GPT-2 or Llama family) as an `lm` network + tokenizer.

The inverse of lm/export/hf.py's mapping, read from the folder's own files (config.json, the weights,
tokenizer.json [+ tokenizer_config.json]); `transformers` is not needed:

- GPT-2 (`model_type: gpt2`: gpt2, distilgpt2, ...): learned positions, LayerNorm with bias, tanh-GELU,
  multi-head attention. Its `Conv1D` weights are (in, out), ours (out, in): transposed; `c_attn` is
  already our fused q,k,v layout.
- Llama (`model_type: llama`: TinyLlama, SmolLM, Llama 2 / 3, ...): RoPE (both rotate half), RMSNorm,
  SwiGLU (gate_proj, up_proj stacked into our fused gate_up_proj rows), grouped-query attention (q, k, v
  stacked into qkv_proj). `attention_bias` / `mlp_bias`: our one `bias` flag, with zero biases where
  Hugging Face has none (the same function).

Anything the GPTConfig cannot compute exactly (an exact-erf GELU, scaled RoPE, a head_dim other than
hidden / heads, ...) is refused with its name instead of importing a model that computes something else.
The result reproduces the Hugging Face model's logits (tests/test_import_hf.py: within 1e-4 in fp32).

Tokenizer: tokenizer.json as lm's `Tokenizer` reads it (byte-level BPE, or SentencePiece-style BPE with
byte fallback, lm/data/tokenizer.py). `lm` ends documents and generations at `<|endoftext|>`
(`Tokenizer.eot_id`), so the model's end-of-sequence token (tokenizer_config.json's `eos_token`, else
config.json's `eos_token_id`) is renamed to it: the id, which is what the weights know, is unchanged.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor

from lm.data.tokenizer import EOT, Tokenizer
from lm.errors import LMError, MissingFileError
from lm.model import GPT, GPTConfig, build_gpt

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")
# transformers' defaults for keys a config.json may leave out (GPT2Config, LlamaConfig).
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "tie_word_embeddings": True}
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "mlp_bias": False, "head_dim": None}
# GELU's tanh approximation under its three transformers names (one formula); `gelu` is the exact erf form.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# GPT-2 options that change the function: name -> the only value lm computes. (`reorder_and_upcast_attn`
# is not here: it only upcasts attention to fp32 in half precision, the same function.)
GPT2_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
# Tensors a checkpoint may carry that are not weights: causal-mask and RoPE buffers of older transformers.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer, list[str]]:
    """`(model, tokenizer, notes)` of a Hugging Face folder; notes are what the caller should tell the user."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    config = gpt_config_from_hf(hf_config, folder)
    tokenizer, notes = read_hf_tokenizer(folder, hf_config)
    if tokenizer.vocab_size > config.vocab_size:
        raise LMError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                      f"{config.vocab_size}: they do not belong together. Use the tokenizer of this model.")
    weights = read_hf_weights(folder)
    state = (gpt2_state_dict if hf_config["model_type"] == "gpt2" else llama_state_dict)(weights, config)
    model = build_gpt(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # a shape that config.json does not describe
        problem = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise LMError(f"{folder}: the weights do not fit config.json ({problem[:200]}). The folder mixes two "
                      f"models: download it again.") from error
    return model.to(dtype).eval(), tokenizer, notes


# ---------------------------------------------------------------------------------------- config
def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a supported model type, as a dict."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder: pass the folder of a Hugging Face model "
                               f"(e.g. the --local-dir of `huggingface-cli download gpt2 --local-dir gpt2`).")
    hf_config = _read_json(folder / "config.json", "the model's config")
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LMError(f"{folder}: model_type {model_type!r} is not supported: lm import reads "
                      f"{' and '.join(SUPPORTED_MODEL_TYPES)} models (GPT-2, DistilGPT2, TinyLlama, SmolLM, Llama 2/3).")
    return hf_config


def gpt_config_from_hf(hf_config: dict[str, Any], folder: Path) -> GPTConfig:
    """The GPTConfig that computes what the Hugging Face model computes, or an LMError naming what it cannot."""
    make = _gpt2_config if hf_config["model_type"] == "gpt2" else _llama_config
    try:
        return make(hf_config)
    except LMError as error:
        raise LMError(f"{folder}: {error}") from error


def _gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    get = _with_defaults(hf, GPT2_DEFAULTS)
    if get("activation_function") not in TANH_GELUS:
        raise LMError(f"activation_function {get('activation_function')!r} is not computed by lm's GPT-2 layout, "
                      f"which has GELU's tanh form ({', '.join(TANH_GELUS)}): cannot import it exactly.")
    for key, needed in GPT2_FIXED.items():
        if hf.get(key, needed) != needed:
            raise LMError(f"{key}={hf[key]!r} changes the attention lm computes (it needs {needed!r}): "
                          f"cannot import this GPT-2 variant exactly.")
    hidden = get("n_embd")
    return GPTConfig(vocab_size=get("vocab_size"), hidden_size=hidden, num_hidden_layers=get("n_layer"),
                     num_attention_heads=get("n_head"), intermediate_size=get("n_inner") or 4 * hidden,
                     max_position_embeddings=get("n_positions"), dropout=0.0, bias=True,
                     tie_embeddings=get("tie_word_embeddings"), norm="layernorm", norm_eps=get("layer_norm_epsilon"),
                     position="learned", activation="gelu")


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    get = _with_defaults(hf, LLAMA_DEFAULTS)
    if get("hidden_act") not in ("silu", "swish"):
        raise LMError(f"hidden_act {get('hidden_act')!r}: lm's SwiGLU computes silu only; cannot import it exactly.")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise LMError(f"head_dim={get('head_dim')} differs from hidden_size / num_attention_heads = {hidden} / {heads}: "
                      f"lm's attention has heads of hidden_size / num_attention_heads channels.")
    return GPTConfig(vocab_size=get("vocab_size"), hidden_size=hidden, num_hidden_layers=get("num_hidden_layers"),
                     num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
                     intermediate_size=get("intermediate_size"), max_position_embeddings=get("max_position_embeddings"),
                     dropout=0.0, bias=bool(get("attention_bias") or get("mlp_bias")),
                     tie_embeddings=get("tie_word_embeddings"), norm="rmsnorm", norm_eps=get("rms_norm_eps"),
                     position="rope", rope_base=llama_rope_base(hf), activation="swiglu")


def llama_rope_base(hf: dict[str, Any]) -> float:
    """RoPE's base from transformers 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`; scaled RoPE
    (linear, dynamic, yarn, llama3, ...) and partial rotation are refused: lm rotates every channel, unscaled."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise LMError("rope_parameters differ per layer type: lm has one RoPE for every layer.")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise LMError(f"RoPE scaling {rope_type!r} is not computed by lm (plain RoPE only): cannot import it exactly.")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise LMError(f"partial_rotary_factor={partial}: lm rotates every channel of a head.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> Callable[[str], Any]:
    return lambda key: hf[key] if key in hf else defaults[key]


# --------------------------------------------------------------------------------------- weights
def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of model.safetensors or pytorch_model.bin, or of the shards their index.json names."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise MissingFileError(f"{folder} has no weights lm reads ({', '.join(WEIGHT_FILES)}): download the "
                               f"PyTorch/safetensors weights too (TensorFlow and Flax files are not read).")
    if found.name.endswith(".index.json"):
        weight_map = _read_json(found, "the weight shards' index").get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = [found.name]
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(_read_weight_file(folder / name))
    return tensors


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise MissingFileError(f"Weight shard {path} is missing (named in its index.json): download it too.")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise LMError(f"{path} holds pickled Python objects, which lm never loads (unpickling can run code): "
                      f"use the model's safetensors weights.") from error
    except Exception as error:  # truncated / corrupt
        raise LMError(f"Cannot read {path}: {str(error).strip().splitlines()[0] if str(error).strip() else error}. "
                      f"The file is truncated or corrupt: download it again.") from error
    if not isinstance(tensors, dict):
        raise LMError(f"{path} does not hold a dict of tensors: use the model's safetensors weights.")
    return tensors


class _Weights:
    """The source tensors under a prefix; `take` marks each used, `leftover` names the rest."""

    def __init__(self, tensors: dict[str, Tensor], prefixes: tuple[str, ...], probe: str):
        self.prefix = next((p for p in prefixes if p + probe in tensors), None)
        if self.prefix is None:
            raise LMError(f"The weights have no {probe} (under {' or '.join(repr(p) for p in prefixes)}): they are "
                          f"not this config.json's model type. Download the folder again.")
        self.tensors, self.used = tensors, set()

    def take(self, name: str, prefix: Optional[str] = None) -> Tensor:
        key = (self.prefix if prefix is None else prefix) + name
        if key not in self.tensors:
            raise LMError(f"The weights have no {key}, which config.json implies: download the folder again.")
        self.used.add(key)
        return self.tensors[key]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in self.tensors if k not in self.used and not k.endswith(IGNORED_SUFFIXES)
                      and k not in ignore)
        if left:
            raise LMError(f"The weights hold tensors lm's layout has no place for ({', '.join(left[:4])}"
                          f"{' ...' if len(left) > 4 else ''}): config.json does not describe this model.")


def gpt2_state_dict(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """GPT-2 names and Conv1D (in, out) weights -> lm's names and (out, in) weights."""
    w = _Weights(tensors, ("transformer.", ""), "wte.weight")
    state = {"embed_tokens.weight": w.take("wte.weight"), "embed_positions.embedding.weight": w.take("wpe.weight"),
             "norm.weight": w.take("ln_f.weight"), "norm.bias": w.take("ln_f.bias")}
    for i in range(config.num_hidden_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        for hf, ours in {"ln_1": "attn_norm", "ln_2": "mlp_norm"}.items():
            for kind in ("weight", "bias"):
                state[f"{dst}{ours}.{kind}"] = w.take(f"{src}{hf}.{kind}")
        for hf, ours in {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
                         "mlp.c_proj": "mlp.down_proj"}.items():
            state[f"{dst}{ours}.weight"] = w.take(f"{src}{hf}.weight").t()  # Conv1D stores (in, out)
            state[f"{dst}{ours}.bias"] = w.take(f"{src}{hf}.bias")
    return _with_head(state, w, config)


def llama_state_dict(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Llama names, separate q/k/v and gate/up -> lm's names and fused qkv_proj / gate_up_proj."""
    w = _Weights(tensors, ("model.", ""), "embed_tokens.weight")
    state = {"embed_tokens.weight": w.take("embed_tokens.weight"), "norm.weight": w.take("norm.weight")}
    fused = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
             "mlp.down_proj": ("mlp.down_proj",)}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        state[f"{dst}attn_norm.weight"] = w.take(f"{src}input_layernorm.weight")
        state[f"{dst}mlp_norm.weight"] = w.take(f"{src}post_attention_layernorm.weight")
        for ours, names in fused.items():
            weights = [w.take(f"{src}{name}.weight") for name in names]
            state[f"{dst}{ours}.weight"] = torch.cat(weights)
            if config.bias:  # zeros where Hugging Face has none (attention_bias without mlp_bias or the reverse)
                state[f"{dst}{ours}.bias"] = torch.cat(
                    [w.take(f"{src}{name}.bias") if w.has(f"{src}{name}.bias") else weight.new_zeros(weight.shape[0])
                     for name, weight in zip(names, weights)])
    return _with_head(state, w, config)


def _with_head(state: dict[str, Tensor], w: _Weights, config: GPTConfig) -> dict[str, Tensor]:
    """An untied head is `lm_head.weight` (outside the base model's prefix); a tied one is the embedding
    (a copy of it in the file, which some savers write, is ignored)."""
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
        w.check_all_used(ignore=("lm_head.weight",))
    else:
        state["lm_head.weight"] = w.take("lm_head.weight", prefix="")
        w.check_all_used()
    return state


# ------------------------------------------------------------------------------------- tokenizer
def read_hf_tokenizer(folder: Path, hf_config: dict[str, Any]) -> tuple[Tokenizer, list[str]]:
    """tokenizer.json with the model's end-of-sequence token renamed `<|endoftext|>` (see the module docstring)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise MissingFileError(f"{folder} has no tokenizer.json (lm reads the fast-tokenizer file only). With "
                               f"transformers: AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}') "
                               f"writes it.")
    spec = _read_json(path, "the tokenizer")
    tokenizer_config = _read_json(folder / "tokenizer_config.json", "", required=False)
    eos, notes = end_of_sequence(spec, tokenizer_config, hf_config), []
    known = _token_ids(spec)
    if eos is None:
        notes.append("No end-of-sequence token found (tokenizer_config.json eos_token, config.json eos_token_id): "
                     "generation stops at the token budget or a stop string only.")
    elif eos != EOT and EOT in known:
        notes.append(f"The model's end-of-sequence token is {eos!r}, but the tokenizer also has {EOT!r}, which lm "
                     f"ends documents and generations with: {eos!r} is kept as an ordinary special token.")
    elif eos != EOT:
        spec = rename_token(spec, eos, EOT)
        notes.append(f"The end-of-sequence token {eos!r} (id {known[eos]}) is named {EOT!r} in lm, which ends "
                     f"documents and generations with it.")
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)), notes


def end_of_sequence(spec: dict, tokenizer_config: dict, hf_config: dict) -> Optional[str]:
    """The text of the model's end-of-sequence token, if the folder names one that the tokenizer has."""
    known = _token_ids(spec)
    eos = tokenizer_config.get("eos_token")
    if isinstance(eos, dict):  # an AddedToken written out by older transformers
        eos = eos.get("content")
    if eos in known:
        return eos
    eos_id = hf_config.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    return next((token for token, i in known.items() if i == eos_id), None)


def rename_token(spec: dict, old: str, new: str) -> dict:
    """`spec` (a tokenizer JSON) with token `old` called `new`: same id, in the added tokens, the model's
    vocabulary and the post-processor's templates."""
    spec = json.loads(json.dumps(spec))
    for token in spec.get("added_tokens", []):
        if token["content"] == old:
            token["content"] = new
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        spec["model"]["vocab"] = [[new if piece == old else piece, score] for piece, score in vocab]

    def renamed(node: Any) -> Any:
        if isinstance(node, dict):
            return {(new if k == old else k): renamed(v) for k, v in node.items()}
        if isinstance(node, list):
            return [renamed(v) for v in node]
        return new if node == old else node

    spec["post_processor"] = renamed(spec.get("post_processor"))
    return spec


def _token_ids(spec: dict) -> dict[str, int]:
    """text -> id of every token a tokenizer JSON defines (model vocabulary and added tokens)."""
    vocab = (spec.get("model") or {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {piece: i for i, (piece, _) in enumerate(vocab)}
    ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return ids


def _read_json(path: Path, what: str, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if not required:
            return {}
        raise MissingFileError(f"{path} not found ({what}): pass the folder of a Hugging Face model, as "
                               f"`huggingface-cli download <repo> --local-dir <folder>` writes it.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LMError(f"{path} is not valid JSON ({error}): download the folder again.") from error
    if not isinstance(value, dict):
        raise LMError(f"{path} holds a JSON {type(value).__name__}, not an object: download the folder again.")
    return value
