"""`lm export --format gguf`: one `model.gguf` file for llama.cpp, Ollama and LM Studio, written with the
`gguf` package (llama.cpp's own writer, the `gguf` extra: `pip install 'lm[gguf]'`), following the
conventions of llama.cpp's `convert_hf_to_gguf.py`.

An architecture llama.cpp already has must compute exactly what the model does, so only two map:

- `llama` for the llama preset: RMSNorm, RoPE, SwiGLU (our fused gate_up rows split into ffn_gate and
  ffn_up), grouped-query attention; optional biases load too. lm's RoPE rotates the two *halves* of a
  head (the Hugging Face layout) while llama.cpp's llama rotates *adjacent pairs*, so the rows of the
  query and key projections are reordered per head (the permutation convert_hf_to_gguf applies to HF
  Llama checkpoints): channel j of the first half goes to row 2j, channel j of the second half to 2j+1.
- `gpt2` for the GPT-2 preset (the default GPT): learned positions, LayerNorm, GELU (tanh), multi-head
  attention with the fused q,k,v projection (our qkv_proj is already llama.cpp's attn_qkv). llama.cpp's
  gpt2 requires biases: a model trained with `bias: false` gets zero biases (same function).

Everything else (QK-norm, ReLU², residual scalars, logit soft-capping, sinusoidal positions) is refused
with the feature named. The context cache is a scoring device outside the network: the file holds the
network's plain softmax, which is also what `lm generate` samples by default.

The tokenizer is embedded as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer
`gpt-2`: the GPT-2 regex lm's ByteLevel pre-tokenizer uses), with the merges, and `<|endoftext|>` as
both BOS and EOS; no BOS is prepended (lm never does).

Weight types (`gguf_type`): `f32`; `f16` (llama.cpp's default, half the size); `q8_0` (blocks of 32
int8 with an f16 scale, ~1/3.8 of f32): 2-D weight matrices only, through `gguf.quants.quantize`. Norm
weights, biases and the position table stay f32 as in convert_hf_to_gguf, and a matrix whose rows are
not a multiple of q8_0's block falls back to f16 (as there, with a note).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lm.errors import LMError
from lm.export.folder import write_folder
from lm.export.hf import llama_tensors
from lm.extras import require
from lm.model import GPT, GPTConfig

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
FILE_NAME = "model.gguf"
TOKEN_TYPES = {"normal": 1, "control": 3, "unused": 5}  # gguf.TokenType, llama.cpp's llama_token_type

# What each llama.cpp architecture needs from a GPTConfig: field -> required value.
_REQUIREMENTS: dict[str, dict[str, object]] = {
    "llama": {"norm": "rmsnorm", "position": "rope", "activation": "swiglu", "qk_norm": False, "logit_softcap": None,
              "residual_scalars": False, "value_embeddings": 0, "bigram_embedding": 0, "smear": False},
    "gpt2": {"norm": "layernorm", "position": "learned", "activation": "gelu", "qk_norm": False, "logit_softcap": None,
             "residual_scalars": False, "value_embeddings": 0, "bigram_embedding": 0, "smear": False},
}


def gguf_architecture(config: GPTConfig) -> str:
    """`llama` or `gpt2`: the llama.cpp architecture that computes exactly what `config` does, or an
    `LMError` naming the features the closest one lacks."""
    config = config.resolved()
    problems = {arch: [f"{field}={getattr(config, field)!r} (llama.cpp's {arch} needs {value!r})"
                       for field, value in needs.items() if getattr(config, field) != value]
                for arch, needs in _REQUIREMENTS.items()}
    if config.num_key_value_heads != config.num_attention_heads:
        problems["gpt2"].append(f"num_key_value_heads={config.num_key_value_heads} (llama.cpp's gpt2 has no "
                                f"grouped-query attention: needs {config.num_attention_heads})")
    for arch, found in problems.items():
        if not found:
            return arch
    closest = min(problems, key=lambda arch: len(problems[arch]))
    raise LMError(f"This model has no llama.cpp architecture to run it: the closest, {closest}, differs in "
                  f"{', '.join(problems[closest])}. Export it with --format safetensors or onnx instead.")


def rope_pairs_layout(weight: Tensor, num_heads: int) -> Tensor:
    """Reorder the rows of a query or key projection (weight or bias) from lm's rotate-half RoPE layout to
    llama.cpp's adjacent-pair layout: per head, rows [first half | second half] -> interleaved. The
    attention scores are unchanged (q and k are permuted alike); convert_hf_to_gguf's `permute`."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


@dataclass
class GGUFTokenizer:
    """What llama.cpp's byte-level BPE needs: one token string and type per model row, the merges, EOT."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eot_id: int


def gguf_tokenizer(tokenizer, vocab_size: int) -> GGUFTokenizer:
    """The tokenizer as llama.cpp's `gpt2` tokenizer model, padded to the model's `vocab_size` rows (a
    tokenizer trained on a small text may have fewer tokens than the embedding has rows)."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    regex_byte_level = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                        and not pre.get("add_prefix_space", False))
    if model.get("type") != "BPE" or not regex_byte_level or spec.get("normalizer") is not None:
        raise LMError("lm export --format gguf needs lm's byte-level BPE tokenizer (data.tokenizer_kind bpe): llama.cpp "
                      "has no counterpart for this one (a char, word or unigram vocabulary, or a custom pre-tokenizer). "
                      "Export it with --format safetensors or onnx instead.")
    if tokenizer.eot_id is None:
        raise LMError("lm export --format gguf needs the tokenizer's <|endoftext|> token (llama.cpp's end of "
                      "generation), and this tokenizer has none. Train the tokenizer with its default special tokens.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_id = {i: token for token, i in model.get("vocab", {}).items()}
    by_id.update({added["id"]: added["content"] for added in spec.get("added_tokens", [])})
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TOKEN_TYPES["control" if i in tokenizer.special_ids else "normal"])
        else:  # a row the tokenizer never produces: the placeholder convert_hf_to_gguf writes
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPES["unused"])
    return GGUFTokenizer(tokens, types, merges, tokenizer.eot_id)


# ------------------------------------------------------------------------------------------- tensors
# transformers' Llama names (lm.export.hf.llama_tensors) -> llama.cpp's, as convert_hf_to_gguf maps them
_LLAMA_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LLAMA_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                      "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                      "mlp.down_proj": "ffn_down"}


def _llama_tensors(model: GPT) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor) of the llama architecture: the Hugging Face Llama tensors renamed, with the query and
    key rows in llama.cpp's RoPE order. A tied head is token_embd: llama.cpp reads it there when output is absent."""
    config = model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, tensor in llama_tensors(model).items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            layer, inner = module[len("model.layers."):].split(".", 1)
            gguf_module = f"blk.{layer}.{_LLAMA_LAYER_NAMES[inner]}"
        else:
            gguf_module = _LLAMA_NAMES[module]
        base = gguf_module.rsplit(".", 1)[-1]
        yield f"{gguf_module}.{kind}", rope_pairs_layout(tensor, heads[base]) if base in heads else tensor


def _gpt2_tensors(model: GPT) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor) of the gpt2 architecture; every bias llama.cpp requires, zeros where we have none."""
    state, config = model.state_dict(), model.config
    yield "token_embd.weight", state["embed_tokens.weight"]
    yield "position_embd.weight", state["embed_positions.embedding.weight"]
    names = {"attn_norm": "attn_norm", "attn.qkv_proj": "attn_qkv", "attn.o_proj": "attn_output",
             "mlp_norm": "ffn_norm", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = state[f"layers.{i}.{ours}.weight"]
            yield f"blk.{i}.{theirs}.weight", weight
            yield f"blk.{i}.{theirs}.bias", state.get(f"layers.{i}.{ours}.bias", torch.zeros(weight.shape[0]))
    yield "output_norm.weight", state["norm.weight"]
    yield "output_norm.bias", state.get("norm.bias", torch.zeros(config.hidden_size))
    if not config.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]


def keeps_f32(name: str, array: np.ndarray) -> bool:
    """Tensors convert_hf_to_gguf always writes as f32: 1-D ones (norms, biases) and the position table."""
    return array.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd.")


def encode_tensor(gguf, name: str, array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, object, bool]:
    """(data, GGML type, fell back to f16?) of one float32 tensor as `gguf_type` asks."""
    types = gguf.GGMLQuantizationType
    qtype = types.F32 if gguf_type == "f32" or keeps_f32(name, array) else {"f16": types.F16, "q8_0": types.Q8_0}[gguf_type]
    try:
        return gguf.quants.quantize(array, qtype), qtype, False
    except gguf.QuantError:  # rows not a multiple of the q8_0 block: f16, as convert_hf_to_gguf does
        return gguf.quants.quantize(array, types.F16), types.F16, True


# ------------------------------------------------------------------------------------------- writing
def export_gguf(model: GPT, tokenizer, output: str | Path, overwrite: bool = False, gguf_type: GGUFType = "f16") -> Path:
    """Write `output`/model.gguf (weights, hyper-parameters and tokenizer in one file) for llama.cpp."""
    (gguf,) = require("gguf", "lm export --format gguf")
    if gguf_type not in GGUF_TYPES:
        raise LMError(f"--gguf_type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}.")
    if model.config.context_cache:
        model = model.without_context_cache()
    arch = gguf_architecture(model.config)
    vocab = gguf_tokenizer(tokenizer, model.config.vocab_size)
    tensors = _llama_tensors(model) if arch == "llama" else _gpt2_tensors(model)
    encoded, fallbacks = [], []
    for name, tensor in tensors:
        array = tensor.detach().float().cpu().contiguous().numpy()
        data, qtype, fell_back = encode_tensor(gguf, name, array, gguf_type)
        encoded.append((name, data, qtype))
        fallbacks += [name] if fell_back else []
    if fallbacks:
        print(f"{len(fallbacks)} matrices have rows that are not a multiple of 32 and are written as f16, not "
              f"q8_0: {', '.join(fallbacks[:4])}{' ...' if len(fallbacks) > 4 else ''}")
    name = Path(output).name

    def fill(folder: Path) -> None:
        writer = gguf.GGUFWriter(str(folder / FILE_NAME), arch)
        _write_metadata(gguf, writer, model.config, arch, gguf_type, name)
        _write_tokenizer(writer, vocab)
        for tensor_name, data, qtype in encoded:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_folder(output, fill, overwrite)


def _write_metadata(gguf, writer, config: GPTConfig, arch: str, gguf_type: str, name: str) -> None:
    """The hyper-parameters llama.cpp reads for `arch` (the keys convert_hf_to_gguf writes)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_base)
        writer.add_rope_dimension_count(config.head_dim)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    file_types = gguf.LlamaFileType
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16,
                          "q8_0": file_types.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, vocab: GGUFTokenizer) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: lm's ByteLevel(use_regex=True) pre-tokenizer
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eot_id)
    writer.add_eos_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)  # lm's prompts start with the text itself
    writer.add_add_eos_token(False)
