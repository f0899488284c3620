"""`lm export --format hf`: a hub-ready folder Hugging Face `transformers` loads with `AutoModelForCausalLM`
and `AutoTokenizer`, for every GPT `lm` trains.

Where transformers has the architecture, the folder uses it and needs no code of ours:
- GPT-2 (`GPT2LMHeadModel`) for learned positions, LayerNorm, GELU (tanh), multi-head attention. GPT-2 keeps its
  linear weights as `Conv1D` (in, out), so ours (out, in) are transposed; the fused q,k,v projection is
  already GPT-2's `c_attn` layout. GPT-2 always has biases: a model trained with `bias: false` gets zero
  biases (same function).
- Llama (`LlamaForCausalLM`) for RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases (the llama
  preset): our fused gate_up rows split into gate_proj, up_proj; both use RoPE's rotate-half layout.

Every other variant (the default recipe's RoPE + QK-norm + ReLU², sinusoidal positions, logit soft-capping,
residual scalars, value embeddings, ...) goes through transformers' custom-code path: the folder carries `configuration_lm.py`
and `modeling_lm.py` (lm/export/hf_remote_code/, torch + transformers only), named in config.json's
`auto_map`, and loads with `trust_remote_code=True`. Its weights keep lm's names under `model.`.

The context cache (`GPTConfig.context_cache`) is a scoring device outside the network: every hf folder holds
the network's own softmax (stated in the model card), which is also what `lm generate` samples by default.
generation_config.json carries `lm generate`'s sampling defaults. Config field names of the native mappings
are those of transformers 5.x (`rope_parameters`), with the 4.x `rope_theta` also written.

`transformers` is not needed to write the folder (JSON, Python source and safetensors), only to load it.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lm.data.tokenizer import EOT
from lm.errors import LMError
from lm.export.folder import write_folder, write_json
from lm.model import GPT, GPTConfig, GPTWithContextCache, SamplingOptions
from lm.model.layers import MLP, Block, CausalSelfAttention, SwiGLU

REMOTE_CODE = Path(__file__).resolve().parent / "hf_remote_code"
REMOTE_CODE_FILES = ("configuration_lm.py", "modeling_lm.py")
REMOTE_MODEL_TYPE = "lm_gpt"
AUTO_MAP = {"AutoConfig": "configuration_lm.LMConfig", "AutoModel": "modeling_lm.LMModel",
            "AutoModelForCausalLM": "modeling_lm.LMForCausalLM"}

# What each native architecture needs from a GPTConfig: field -> required value.
_REQUIREMENTS = {
    "gpt2": {"norm": "layernorm", "position": "learned", "activation": "gelu", "qk_norm": False, "logit_softcap": None,
             "residual_scalars": False, "value_embeddings": 0, "bigram_embedding": 0, "smear": False},
    "llama": {"norm": "rmsnorm", "position": "rope", "activation": "swiglu", "qk_norm": False, "logit_softcap": None,
              "residual_scalars": False, "value_embeddings": 0, "bigram_embedding": 0, "smear": False},
}


def hf_architecture(config: GPTConfig) -> str:
    """`gpt2` or `llama` where a transformers architecture computes exactly what `config` does (no custom code),
    else `lm_gpt`: lm's own architecture, shipped as code (`trust_remote_code=True`)."""
    config = config.resolved()
    for arch, needs in _REQUIREMENTS.items():
        if all(getattr(config, k) == v for k, v in needs.items()):
            if arch == "gpt2" and config.num_key_value_heads != config.num_attention_heads:
                continue  # GPT-2 has no grouped-query attention
            return arch
    return REMOTE_MODEL_TYPE


def check_exportable(model: nn.Module) -> None:
    """The exported code is lm's stock GPT: refuse a network whose classes (a custom block or attention, a
    subclass of GPT) or weights differ from it, instead of writing a folder that computes something else."""
    stock = {GPT, GPTWithContextCache}
    parts = [(model, stock)] + [(m, {Block}) for m in getattr(model, "layers", [])]
    parts += [(m.attn, {CausalSelfAttention}) for m in getattr(model, "layers", [])]
    parts += [(m.mlp, {MLP, SwiGLU}) for m in getattr(model, "layers", [])]
    custom = sorted({type(m).__name__ for m, allowed in parts if type(m) not in allowed})
    if custom:
        raise LMError(f"This network uses {', '.join(custom)}, which lm's exported code does not implement: the "
                      f"Hugging Face folder would compute something else. Export it with --format safetensors instead.")
    with torch.device("meta"):
        expected = set(GPT(dataclasses.replace(model.config, context_cache=False)).state_dict())
    actual = {k for k in model.state_dict() if not k.startswith("context_cache.")}  # the cache is not exported
    if actual != expected:
        extra = sorted(actual ^ expected)[:3]
        raise LMError(f"This network's weights differ from a stock GPT of its config ({', '.join(extra)}): export it "
                      f"with --format safetensors instead.")


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
    """All three layouts name an untied head `lm_head.weight`; a tied one is the embedding, not stored twice."""
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


def llama_tensors(model: GPT) -> dict[str, Tensor]:
    """Our weights under transformers' Llama names (fused q,k,v and gate,up rows split); also what the GGUF
    export renames to llama.cpp's names (lm/export/gguf.py), as llama.cpp's own converter does."""
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


def _remote_tensors(model: GPT) -> dict[str, Tensor]:
    """lm's own names under `model.` (modeling_lm.py mirrors lm's modules); the head only when untied."""
    state = model.state_dict()
    out = {f"model.{name}": tensor for name, tensor in state.items() if name != "lm_head.weight"}
    return _with_untied_head(out, state, model.config)


def _remote_config(config: GPTConfig) -> dict:
    """config.json of the custom-code folder: the resolved GPTConfig (LMConfig's fields), the auto_map that
    points transformers at the carried code, and no context cache (the export is the plain network)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("context_cache", "attention")}
    return {"architectures": ["LMForCausalLM"], "model_type": REMOTE_MODEL_TYPE, "auto_map": AUTO_MAP, **fields,
            "context_cache": False}


def _generation_config(config: dict) -> dict:
    """`lm generate`'s defaults, so `model.generate(ids)` samples as it does; `do_sample=False` is its
    `--temperature 0`. transformers' repetition penalty covers the whole sequence, lm's its last
    `repetition_window` tokens: the two agree while prompt + output fit in that window."""
    lm = SamplingOptions()
    values = {"do_sample": True, "temperature": lm.temperature, "top_k": lm.top_k,
              "repetition_penalty": lm.repetition_penalty}
    if lm.top_p is not None:
        values["top_p"] = lm.top_p
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if "eos_token_id" in ids:
        ids["pad_token_id"] = ids["eos_token_id"]
    return {**ids, **values}


def _tokenizer_files(folder: Path, tokenizer, config: dict, max_length: int) -> None:
    """tokenizer.json as is: `AutoTokenizer` wraps it in a `PreTrainedTokenizerFast`. End-of-text is also the
    padding token, on the left, as lm's own decoder pads a batch of prompts."""
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT} if tokenizer.eot_id is not None else {}
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                  "model_max_length": max_length, "padding_side": "left",
                                                  "clean_up_tokenization_spaces": False, **special})
    if tokenizer.eot_id is not None:
        config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)


def export_hf(model: GPT, tokenizer, output: str | Path, overwrite: bool = False,
              facts: Optional[dict[str, Any]] = None, native: bool = True) -> Path:
    """Write the transformers folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json, README.md (the model card; `facts` from `checkpoint_facts` fill its training
    section) and, for lm's own architecture, configuration_lm.py + modeling_lm.py. `native=False` writes lm's
    own architecture even where GPT-2 or Llama would do (no custom code is the default)."""
    from safetensors.torch import save_file

    check_exportable(model)
    if model.config.context_cache:
        model = model.without_context_cache()
    arch = hf_architecture(model.config) if native else REMOTE_MODEL_TYPE
    tensors, config = {"gpt2": (_gpt2_tensors, _gpt2_config), "llama": (llama_tensors, _llama_config),
                       REMOTE_MODEL_TYPE: (_remote_tensors, _remote_config)}[arch]
    state = {k: v.detach().float().contiguous().clone() for k, v in tensors(model).items()}
    config = {**config(model.config), "torch_dtype": "float32", "use_cache": True}

    def fill(folder: Path) -> None:
        _tokenizer_files(folder, tokenizer, config, model.config.max_position_embeddings)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        write_json(folder / "config.json", config)
        write_json(folder / "generation_config.json", _generation_config(config))
        if arch == REMOTE_MODEL_TYPE:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(REMOTE_CODE / name, folder / name)
        (folder / "README.md").write_text(model_card(model.config, arch, facts or {}, Path(output).name),
                                          encoding="utf-8")

    return write_folder(output, fill, overwrite)


# ---------------------------------------------------------------------------------------- model card
def checkpoint_facts(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """What a checkpoint written by `lm fit` says about its run, for the model card: the experiment (its
    checkpoints/<experiment>/ folder), the step, the data, the optimizer, and the best validation loss the
    checkpoint callback recorded. Keys are absent where the checkpoint does not say (e.g. `lm prune` outputs)."""
    facts: dict[str, Any] = {"checkpoint": Path(ckpt_path).name}
    callbacks = checkpoint.get("callbacks") or {}
    saver = next((v for k, v in callbacks.items() if "Checkpoint" in k and isinstance(v, dict) and v.get("dirpath")), None)
    facts["experiment"] = Path(saver["dirpath"]).name if saver else Path(ckpt_path).resolve().parent.name
    if "global_step" in checkpoint:
        facts["step"], facts["epoch"] = int(checkpoint["global_step"]), int(checkpoint.get("epoch", 0))
    if saver and saver.get("best_model_score") is not None:
        facts["best"] = (saver.get("monitor") or "val/loss", float(saver["best_model_score"]),
                         Path(saver.get("best_model_path") or "").name)
    timer = callbacks.get("Timer", {}).get("time_elapsed", {})
    if timer.get("train"):
        facts["train_seconds"] = float(timer["train"])
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    files = data.get("train_files") or data.get("data_dir")
    hub = f"{data['hub_name']} ({data.get('hub_config') or 'default'})" if data.get("hub_name") else None
    if files or hub:
        facts["data"] = f"files {files}" if files else f"the hub dataset {hub}"
        facts["tokenizer"] = f"{data.get('tokenizer_kind', 'bpe')}, {data.get('vocab_size')} tokens, trained on the training text"
    hp = checkpoint.get("hyper_parameters") or {}
    if hp.get("optimizer"):
        facts["optimizer"] = (f"{hp['optimizer']}, learning rate {hp.get('learning_rate')}, schedule "
                              f"{hp.get('schedule')}, weight decay {hp.get('weight_decay')}")
    averaged = (checkpoint.get("averaging_state") or {}).get("n_averaged")
    if averaged is not None and int(averaged) > 0:  # before averaging starts, the saved weights are the raw ones
        facts["weights"] = f"the exponential moving average of the weights ({int(averaged)} updates; what lm validated)"
    return facts


def model_card(config: GPTConfig, arch: str, facts: dict[str, Any], name: str) -> str:
    """README.md of the folder: hub metadata, how to load it, the architecture, the training facts, what is
    not in the export."""
    remote = arch == REMOTE_MODEL_TYPE
    tags = ["lm", "gpt", "causal-lm"] + (["custom_code"] if remote else [arch])
    header = ["---", "library_name: transformers", "license: other",
              "license_name: unknown  # the checkpoint does not say: set it before publishing",
              "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]
    title = facts.get("experiment") or name
    cls = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}.get(arch, "LMForCausalLM (modeling_lm.py, in this folder)")
    trust = ", trust_remote_code=True" if remote else ""
    body = [f"# {title}", "",
            f"A GPT-style language model trained from scratch with `lm`, exported by `lm export --format hf` as "
            f"`{cls}`.", "", "## Load it", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{trust})',
            f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{trust})',
            'ids = tokenizer("The river", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))", "```", ""]
    if remote:
        body += ["The architecture is lm's own: its code (`configuration_lm.py`, `modeling_lm.py`: torch and "
                 "transformers only) is in this folder, so loading needs `trust_remote_code=True`. Read it first. "
                 "The tokenizer is a plain `PreTrainedTokenizerFast`; transformers 5 reads config.json before it and "
                 "asks about the custom code unless `trust_remote_code=True` is passed there too.", ""]
    body += ["## Architecture (lm's GPTConfig)", "", "| field | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in dataclasses.asdict(config.resolved()).items() if k != "context_cache"]
    body += ["", "## Training", ""]
    body += _training_lines(facts) or ["The checkpoint carries no record of its run."]
    body += ["", "## Not in this export", "",
             "- lm's context cache (`GPTConfig.context_cache`, a copy distribution over the window mixed into the "
             "softmax when lm scores text): the export is the network's own softmax, which is what `lm generate` "
             "samples by default. Scores from lm's cache (`val/cache_*`, `test/cache_*`) do not apply to it.",
             "- generation_config.json holds `lm generate`'s defaults (temperature, top-k, repetition penalty); "
             "`do_sample=False` is `lm generate --temperature 0`. transformers applies the repetition penalty to the "
             f"whole sequence, lm to its last {SamplingOptions().repetition_window} tokens.",
             f"- The context is {config.max_position_embeddings} tokens (prompt + output): longer inputs are refused."]
    return "\n".join(header + body) + "\n"


def _training_lines(facts: dict[str, Any]) -> list[str]:
    lines = []
    labels = {"checkpoint": "checkpoint", "experiment": "experiment (checkpoints/<experiment>/)", "data": "training data",
              "tokenizer": "tokenizer", "optimizer": "optimizer", "weights": "weights"}
    for key, label in labels.items():
        if key in facts:
            lines.append(f"- {label}: {facts[key]}")
    if "step" in facts:
        lines.append(f"- trained for {facts['step']} optimizer steps (epoch {facts['epoch']})"
                     + (f", {facts['train_seconds'] / 60:.1f} minutes" if "train_seconds" in facts else ""))
    if "best" in facts:
        monitor, value, path = facts["best"]
        lines.append(f"- best {monitor} recorded by the run: {value:.4f}" + (f" ({path})" if path else "")
                     + " -- lm's figure for its own validation split, in nats per token")
    return lines
