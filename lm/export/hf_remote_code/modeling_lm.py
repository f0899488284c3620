"""`LMForCausalLM`: a GPT trained with `lm`, rewritten on transformers' `PreTrainedModel` + `GenerationMixin`.

It computes what `lm`'s `GPT` (lm/model/gpt.py, layers.py) computes, layer for layer and with the same
parameter names under `model.`: pre-norm blocks with LayerNorm or RMSNorm, learned / sinusoidal / rotary
positions, grouped-query attention with optional QK-norm, a GELU (tanh), ReLU² or SwiGLU MLP, optional
residual scalars (each block mixes the embedding back in) and logit soft-capping, a tied or untied head.
`lm export --format hf` copies this file into the folder it writes; it imports only torch and transformers.

Generation keeps keys and values in transformers' `DynamicCache` (the `cache` argument of transformers 5,
`past_key_values` of 4.x); left padding is handled with `attention_mask` and `position_ids`, as `lm`'s own
decoder does. Not exported: `lm`'s context cache (a scoring-time mixture outside the network): this model is
the network's own softmax, what `lm generate` samples by default.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lm import LMConfig

# transformers 5 renamed the output's `past_key_values` to `cache` (the old name still works, with a warning).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def make_norm(config: LMConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


# Position tables are recomputed from the config (as lm does at construction), not stored: they are no weights,
# and transformers builds models on the meta device, where a non-persistent buffer would be left empty.
def sinusoidal_table(config: LMConfig) -> Tensor:
    """(max_positions, hidden): "Attention Is All You Need"'s sin/cos table, computed as lm computes it."""
    hidden = config.hidden_size
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * (-math.log(10000.0) / hidden))
    table = torch.zeros(config.max_position_embeddings, hidden)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq[: hidden // 2])
    return table


def rotary_tables(config: LMConfig) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (max_positions, head_dim), in the rotate-half layout lm (and LLaMA) use."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def causal_mask(T: int, past: int, attention_mask: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """Boolean (True = may attend) mask of T new queries after `past` cached positions; None when plain causal
    attention (SDPA's is_causal, or one query seeing every key) is exact. Padding keys (0 in the 2D
    `attention_mask`) are hidden; each query still sees itself, so a padding row's softmax is never empty."""
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    mask = torch.arange(S, device=device)[None, :] <= query_pos
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :S].bool()
        diagonal = torch.arange(S, device=device)[None, :] == query_pos
        mask = (mask & keys) | diagonal
    return mask


class LMAttention(nn.Module):
    """Causal self-attention: one fused q,k,v projection, optional QK-norm (RMSNorm per head), RoPE, GQA."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.dropout_p = config.attention_dropout
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], cache: Optional[Cache],
                mask: Optional[Tensor]) -> Tensor:
        B, T, _ = x.shape
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.num_kv_heads != self.num_heads:  # each key/value head serves a group of query heads
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
                                           is_causal=mask is None and T > 1)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)))


class LMMLP(nn.Module):
    """up -> GELU (tanh) or relu(x)^2 -> down; or SwiGLU: down(silu(gate) * up), gate and up in one matmul."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.activation, self.intermediate_size = config.activation, config.intermediate_size
        if config.activation == "swiglu":
            self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.bias)
        else:
            self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class LMBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); with residual scalars, the block first reads
    residual_scale * x + embedding_scale * x0."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.hidden_size)
        self.attn = LMAttention(config, layer_idx)
        self.mlp_norm = make_norm(config, config.hidden_size)
        self.mlp = LMMLP(config)
        if config.residual_scalars:
            self.residual_scale = nn.Parameter(torch.ones(()))
            self.embedding_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, x0: Optional[Tensor], rotary: Optional[tuple[Tensor, Tensor]],
                cache: Optional[Cache], mask: Optional[Tensor]) -> Tensor:
        if x0 is not None:
            x = self.residual_scale * x + self.embedding_scale * x0
        x = x + self.attn(self.attn_norm(x), rotary, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class LMPreTrainedModel(PreTrainedModel):
    config_class = LMConfig
    base_model_prefix = "model"
    _no_split_modules = ["LMBlock"]
    _supports_cache_class = True  # transformers 4.x: hand the model a DynamicCache, not tuples
    _supports_static_cache = False

    def _init_weights(self, module: nn.Module) -> None:
        """lm's initialization, N(0, init_std), for weights a checkpoint does not hold (a new model)."""
        std = getattr(self.config, "init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class LearnedPositions(nn.Module):
    """GPT-2's position table (named as in lm: `embed_positions.embedding`)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class LMModel(LMPreTrainedModel):
    """Embeddings -> blocks -> final norm: the hidden states the LM head reads."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = LearnedPositions(config) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LMBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self._tables: dict = {}  # (kind, device) -> position tables, made on first use
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _table(self, kind: str, device: torch.device):
        key = (kind, str(device))
        if key not in self._tables:
            tables = sinusoidal_table(self.config) if kind == "sinusoidal" else rotary_tables(self.config)
            self._tables[key] = tables.to(device) if kind == "sinusoidal" else tuple(t.to(device) for t in tables)
        return self._tables[key]

    def embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], position_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.training and self.config.embedding_dropout > 0 and input_ids is not None:
            # lm's embedding dropout: whole token types dropped for the step, the rest scaled by 1 / (1 - p)
            keep = 1.0 - self.config.embedding_dropout
            weight = self.embed_tokens.weight
            scale = torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype).bernoulli_(keep) / keep
            x = x * scale[input_ids].unsqueeze(-1)
        if self.embed_positions is not None:
            x = x + self.embed_positions.embedding(position_ids)
        elif self.config.position == "sinusoidal":
            x = x + self._table("sinusoidal", x.device)[position_ids].to(x.dtype)
        return self.dropout(x)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                past_key_values: Optional[Cache] = None, **kwargs) -> BaseModelOutputWithPast:
        """The final-norm hidden states (B, T, hidden) the LM head reads, and the cache."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if isinstance(cache, (tuple, list)):  # a 4.x legacy cache
            cache = DynamicCache.from_legacy_cache(cache)
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"Sequence of {past + T} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}, the context this model was trained with.")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D (batch, past + new tokens): 1 for real tokens, 0 for padding.")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        x = self.embed(input_ids, inputs_embeds, position_ids)
        rotary = None
        if self.config.position == "rope":
            cos, sin = self._table("rope", device)
            rotary = (cos[position_ids][:, None].to(x.dtype), sin[position_ids][:, None].to(x.dtype))
        mask = causal_mask(T, past, attention_mask, device)
        x0 = x if self.config.residual_scalars else None
        for block in self.layers:
            x = block(x, x0, rotary, cache, mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})


class LMForCausalLM(LMPreTrainedModel, GenerationMixin):
    """`LMModel` + the LM head (the token embedding when tied), with optional logit soft-capping."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.model = LMModel(config)
        # Tied: no separate module, the head reads the embedding matrix (one tensor in the file, nothing to tie).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return self.lm_head

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, past_key_values: Optional[Cache] = None,
                return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab); the loss of `labels` (the inputs, shifted inside; -100 ignored) if given.
        `cache` (transformers 5) or `past_key_values` (4.x): the keys and values of the tokens before these."""
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         inputs_embeds, use_cache)
        hidden, cache = out.last_hidden_state, getattr(out, _CACHE_FIELD)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()
