"""`lm export --format hf`: a folder Hugging Face `transformers` loads with `AutoModelForCausalLM` and
`AutoTokenizer`, mapped onto an architecture it already has:

- GPT-2 (`GPT2LMHeadModel`) for the default GPT: learned positions, LayerNorm, GELU (tanh), multi-head
  attention. GPT-2 keeps its linear weights as `Conv1D` (in, out), so ours (out, in) are transposed;
  the fused q,k,v projection is already GPT-2's `c_attn` layout. GPT-2 always has biases: a model
  trained with `bias: false` gets zero biases (same function).
- Llama (`LlamaForCausalLM`) for the llama preset: RoPE (both use the rotate-half layout), RMSNorm,
  SwiGLU (our fused gate_up rows split into gate_proj, up_proj), grouped-query attention.

Any other choice (sinusoidal positions, QK-norm, ...) has no counterpart in either: `hf_architecture`
names the feature instead of writing a model that computes something else. The context cache
(`GPTConfig.context_cache`) is a scoring device outside the network: the folder holds the network's own
softmax (`lm export` says so when it drops it), which is also what `lm generate` samples by default. Config field names are
those of transformers 5.x (`rope_parameters`), with the 4.x `rope_theta` also written.

`transformers` is not needed to write the folder (plain JSON + safetensors), only to load it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lm.errors import LMError
from lm.export.folder import write_json, write_folder
from lm.model import GPT, GPTConfig

# What each architecture needs from a GPTConfig: field -> required value.
_REQUIREMENTS = {
    "gpt2": {"norm": "layernorm", "position": "learned", "activation": "gelu", "qk_norm": False, "logit_softcap": None, "residual_scalars": False},
    "llama": {"norm": "rmsnorm", "position": "rope", "activation": "swiglu", "qk_norm": False, "logit_softcap": None, "residual_scalars": False},
}


def hf_architecture(config: GPTConfig) -> str:
    """`gpt2` or `llama`: the transformers architecture that computes exactly what `config` does."""
    config = config.resolved()
    mismatches = {arch: [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(config, k) != v]
                  for arch, needs in _REQUIREMENTS.items()}
    if config.num_key_value_heads != config.num_attention_heads:
        mismatches["gpt2"].append(f"num_key_value_heads={config.num_key_value_heads} (GPT-2 has no grouped-query attention)")
    for arch, problems in mismatches.items():
        if not problems:
            return arch
    closest = min(mismatches, key=lambda a: len(mismatches[a]))
    raise LMError(f"This model has no Hugging Face counterpart: the closest, {closest}, differs in "
                     f"{', '.join(mismatches[closest])}. Export it with --format safetensors or onnx instead.")


def _gpt2_tensors(model: GPT) -> dict[str, Tensor]:
    state, config = model.state_dict(), model.config
    hidden = config.hidden_size

    def bias(name: str, size: int) -> Tensor:  # GPT-2 always has biases: zeros where we had none
        return state.get(name, torch.zeros(size))

    out = {"transformer.wte.weight": state["embed_tokens.weight"],
           "transformer.wpe.weight": state["embed_positions.embedding.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", hidden)}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        pairs = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}
        for hf, ours in pairs.items():
            out[f"{dst}{hf}.weight"] = state[f"{src}{ours}.weight"]
            out[f"{dst}{hf}.bias"] = bias(f"{src}{ours}.bias", hidden)
        convs = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
                 "mlp.c_proj": "mlp.down_proj"}
        for hf, ours in convs.items():
            weight = state[f"{src}{ours}.weight"]
            out[f"{dst}{hf}.weight"] = weight.t()  # Conv1D stores (in, out)
            out[f"{dst}{hf}.bias"] = bias(f"{src}{ours}.bias", weight.shape[0])
    return _with_untied_head(out, state, config)


def _with_untied_head(out: dict[str, Tensor], state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Both architectures name an untied head `lm_head.weight`; a tied one is the embedding, not stored twice."""
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _gpt2_config(config: GPTConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.max_position_embeddings, "n_embd": config.hidden_size,
            "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
            "n_inner": config.intermediate_size, "activation_function": "gelu_pytorch_tanh",
            "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings}


def _llama_tensors(model: GPT) -> dict[str, Tensor]:
    state, config = model.state_dict(), model.config
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[f"{dst}input_layernorm.weight"] = state[f"{src}attn_norm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = state[f"{src}mlp_norm.weight"]
        splits = {"attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                    [q_size, kv_size, kv_size]),
                  "attn.o_proj": (("self_attn.o_proj",), [config.hidden_size]),
                  "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), [config.intermediate_size] * 2),
                  "mlp.down_proj": (("mlp.down_proj",), [config.hidden_size])}
        for ours, (names, sizes) in splits.items():
            for kind in ("weight", "bias"):
                if f"{src}{ours}.{kind}" in state:
                    for name, part in zip(names, state[f"{src}{ours}.{kind}"].split(sizes, dim=0)):
                        out[f"{dst}{name}.{kind}"] = part
    return _with_untied_head(out, state, config)


def _llama_config(config: GPTConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
            "rope_theta": config.rope_base, "attention_bias": config.bias, "mlp_bias": config.bias,
            "attention_dropout": 0.0, "tie_word_embeddings": config.tie_embeddings}


def _tokenizer_files(folder: Path, tokenizer, config: dict, max_length: int) -> None:
    """tokenizer.json as is: `AutoTokenizer` wraps it in a `PreTrainedTokenizerFast`."""
    from lm.data.tokenizer import EOT

    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT} if tokenizer.eot_id is not None else {}
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                  "model_max_length": max_length,
                                                  "clean_up_tokenization_spaces": False, **special})
    if tokenizer.eot_id is not None:
        config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)


def export_hf(model: GPT, tokenizer, output: str | Path, overwrite: bool = False) -> Path:
    """Write the transformers folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    from safetensors.torch import save_file

    if model.config.context_cache:
        model = model.without_context_cache()
    arch = hf_architecture(model.config)
    tensors, config = {"gpt2": (_gpt2_tensors, _gpt2_config), "llama": (_llama_tensors, _llama_config)}[arch]
    state = {k: v.detach().float().contiguous().clone() for k, v in tensors(model).items()}
    config = {**config(model.config), "torch_dtype": "float32", "use_cache": True}

    def fill(folder: Path) -> None:
        _tokenizer_files(folder, tokenizer, config, model.config.max_position_embeddings)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        write_json(folder / "config.json", config)

    return write_folder(output, fill, overwrite)
