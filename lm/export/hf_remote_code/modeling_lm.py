"""`LMForCausalLM`: a GPT trained with `lm`, rewritten on transformers' `PreTrainedModel` + `GenerationMixin`.

It computes what `lm`'s `GPT` (lm/model/gpt.py, layers.py) computes, layer for layer and with the same
parameter names under `model.`: pre-norm blocks with LayerNorm or RMSNorm, learned / sinusoidal / rotary
positions, grouped-query attention with optional QK-norm, a GELU (tanh), ReLU² or SwiGLU MLP, optional
residual scalars (each block mixes the embedding back in), value embeddings (token tables added to the attention
values), the input levers that read the previous token (a hashed bigram table, the gated "smear" of the previous
token's embedding) and logit soft-capping, a tied or untied head.
`lm export --format hf` copies this file into the folder it writes; it imports only torch and transformers.

Generation keeps keys and values in transformers' `DynamicCache` (the `cache` argument of transformers 5,
`past_key_values` of 4.x); left padding is handled with `attention_mask` and `position_ids`, as `lm`'s own
decoder does. A model with bigram_embedding or smear needs the token before the first new one: `generate` hands it
over (`prepare_inputs_for_generation` slices it from the full ids as `previous_input_ids`); a hand-written loop
can pass it, or rely on the cache, which keeps each forward's last token. Not exported: `lm`'s context cache (a scoring-time mixture outside the network): this model is
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


NO_PREVIOUS_TOKEN = -1  # the previous token of a sequence's first (real) position
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many leading channels of the embedding


def previous_token_ids(input_ids: Tensor, first_previous: Optional[Tensor], past: int,
                       attention_mask: Optional[Tensor]) -> Tensor:
    """(B, T) id of the token before each of `input_ids`, NO_PREVIOUS_TOKEN where there is none (the first position,
    or a left-padded row's first real one: the column before it is 0 in `attention_mask` (B, past + T)).
    `first_previous` (B, 1): the token before input_ids[:, 0] when `past` > 0 (lm's KVCache.token_ids column)."""
    B, T = input_ids.shape
    if past == 0 or first_previous is None:
        first_previous = torch.full((B, 1), NO_PREVIOUS_TOKEN, dtype=input_ids.dtype, device=input_ids.device)
    previous = torch.cat([first_previous.to(input_ids), input_ids[:, :-1]], dim=1)
    if attention_mask is not None:
        real = attention_mask[:, :past + T].bool()
        real_before = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
        previous = previous.masked_fill(~real_before[:, past:], NO_PREVIOUS_TOKEN)
    return previous


def bigram_hash(previous_ids: Tensor, input_ids: Tensor, rows: int) -> Tensor:
    """Bigram table row: (36313 * token xor 27191 * previous) mod (rows - 1) in int64, the last row for none."""
    mixed = torch.bitwise_xor(36313 * input_ids, 27191 * previous_ids.clamp(min=0)) % (rows - 1)
    return torch.where(previous_ids == NO_PREVIOUS_TOKEN, rows - 1, mixed)


class LMAttention(nn.Module):
    """Causal self-attention: one fused q,k,v projection, optional QK-norm (RMSNorm per head), RoPE, GQA; a layer
    with value-embedding tables adds value_embedding_scale * their rows to its values (before they are cached)."""

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
        if config.value_embedding_tables(layer_idx):
            self.value_embedding_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], cache: Optional[Cache],
                mask: Optional[Tensor], value_embedding: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if value_embedding is not None:
            ve = value_embedding.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v + (self.value_embedding_scale * ve).to(v.dtype)
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
    residual_scale * x + embedding_scale * x0. `value_embedding`: the layer's value-embedding rows, or None."""

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
                cache: Optional[Cache], mask: Optional[Tensor], value_embedding: Optional[Tensor] = None) -> Tensor:
        if x0 is not None:
            x = self.residual_scale * x + self.embedding_scale * x0
        x = x + self.attn(self.attn_norm(x), rotary, cache, mask, value_embedding)
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
        kv_size = config.num_key_value_heads * config.head_dim
        self.value_embeddings = nn.ModuleList(nn.Embedding(config.vocab_size, kv_size)
                                              for _ in range(config.value_embeddings))
        if config.bigram_embedding:
            self.bigram_embedding = nn.Embedding(config.bigram_embedding, config.hidden_size)
        if config.smear:
            self.smear_gate = nn.Parameter(torch.zeros(1, min(SMEAR_GATE_CHANNELS, config.hidden_size)))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
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

    def embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], position_ids: Tensor,
              previous_ids: Optional[Tensor] = None) -> tuple[Tensor, list[Optional[Tensor]]]:
        """The blocks' input, and each layer's value-embedding rows (None for a layer without a table).
        `previous_ids`: the token before each input token (`previous_token_ids`), for bigram_embedding / smear."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        keep_scale = None
        if self.training and self.config.embedding_dropout > 0 and input_ids is not None:
            # lm's embedding dropout: whole token types dropped for the step, the rest scaled by 1 / (1 - p)
            keep = 1.0 - self.config.embedding_dropout
            weight = self.embed_tokens.weight
            scale = torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype).bernoulli_(keep) / keep
            keep_scale = scale[input_ids].unsqueeze(-1)
            x = x * keep_scale
        if previous_ids is not None:
            x = self.add_previous_token(x, input_ids, previous_ids, keep_scale)
        if self.embed_positions is not None:
            x = x + self.embed_positions.embedding(position_ids)
        elif self.config.position == "sinusoidal":
            x = x + self._table("sinusoidal", x.device)[position_ids].to(x.dtype)
        return self.dropout(x), self.value_embedding_rows(input_ids, keep_scale)

    def add_previous_token(self, x: Tensor, input_ids: Tensor, previous_ids: Tensor,
                           keep_scale: Optional[Tensor]) -> Tensor:
        """lm's GPT._add_previous_token: smear x_t + smear_lambda * sigmoid(smear_gate . x_t[:24]) * x_{t-1} (the
        previous token's unsmeared embedding, 0 where there is none), then + the bigram table's row."""
        if self.config.smear:
            first = self.embed_tokens(previous_ids[:, :1].clamp(min=0))
            gate = self.smear_lambda * torch.sigmoid(F.linear(x[..., :self.smear_gate.shape[1]], self.smear_gate))
            gate = gate * (previous_ids >= 0).unsqueeze(-1).to(gate.dtype)
            x = x + gate * torch.cat([first, x[:, :-1]], dim=1)
        if self.config.bigram_embedding:
            rows = self.bigram_embedding(bigram_hash(previous_ids, input_ids, self.config.bigram_embedding))
            x = x + (rows * keep_scale if keep_scale is not None else rows)
        return x

    def value_embedding_rows(self, input_ids: Optional[Tensor], keep_scale: Optional[Tensor]) -> list[Optional[Tensor]]:
        """Each layer's rows of its value-embedding tables (summed where a layer has two), dropped with the input
        embedding's token types."""
        if not len(self.value_embeddings):
            return [None] * len(self.layers)
        if input_ids is None:
            raise ValueError("This model adds value embeddings (token tables) to its attention values: pass input_ids, "
                             "not inputs_embeds.")
        rows = [table(input_ids) for table in self.value_embeddings]
        if keep_scale is not None:
            rows = [r * keep_scale for r in rows]
        per_layer: list[Optional[Tensor]] = []
        for i in range(len(self.layers)):
            tables = self.config.value_embedding_tables(i)
            value_embedding = rows[tables[0]] if tables else None
            for j in tables[1:]:
                value_embedding = value_embedding + rows[j]
            per_layer.append(value_embedding)
        return per_layer

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                past_key_values: Optional[Cache] = None, previous_input_ids: Optional[Tensor] = None,
                **kwargs) -> BaseModelOutputWithPast:
        """The final-norm hidden states (B, T, hidden) the LM head reads, and the cache. `previous_input_ids` (B, 1):
        the token before input_ids[:, 0] when the cache holds earlier tokens (bigram_embedding / smear need it;
        default: the last token the cache saw)."""
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
        previous_ids = None
        if self.config.reads_previous_token:
            if input_ids is None:
                raise ValueError("This model reads the previous token (bigram_embedding / smear): pass input_ids, not "
                                 "inputs_embeds.")
            if previous_input_ids is None and past > 0:
                previous_input_ids = getattr(cache, "lm_last_input_ids", None)
                if previous_input_ids is None:
                    raise ValueError("This model reads the previous token (bigram_embedding / smear) and the cache "
                                     "does not know it: pass previous_input_ids (B, 1), the token before input_ids.")
            previous_ids = previous_token_ids(input_ids, previous_input_ids, past, attention_mask)
            if cache is not None:  # for a caller that continues the cache without previous_input_ids
                cache.lm_last_input_ids = input_ids[:, -1:]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        x, value_embeddings = self.embed(input_ids, inputs_embeds, position_ids, previous_ids)
        rotary = None
        if self.config.position == "rope":
            cos, sin = self._table("rope", device)
            rotary = (cos[position_ids][:, None].to(x.dtype), sin[position_ids][:, None].to(x.dtype))
        mask = causal_mask(T, past, attention_mask, device)
        x0 = x if self.config.residual_scalars else None
        for block, value_embedding in zip(self.layers, value_embeddings):
            x = block(x, x0, rotary, cache, mask, value_embedding)
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
                return_dict: Optional[bool] = None, previous_input_ids: Optional[Tensor] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab); the loss of `labels` (the inputs, shifted inside; -100 ignored) if given.
        `cache` (transformers 5) or `past_key_values` (4.x): the keys and values of the tokens before these."""
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         inputs_embeds, use_cache, previous_input_ids=previous_input_ids)
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

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args, **kwargs) -> dict:
        """transformers' inputs of a generation step, plus `previous_input_ids` for a model that reads the previous
        token: the token before the step's first new one, sliced from the full ids `generate` keeps (reordered
        with the beams, so beam search sees the right one too)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = model_inputs.get("input_ids")
        if self.config.reads_previous_token and new is not None and input_ids.shape[1] > new.shape[1]:
            model_inputs["previous_input_ids"] = input_ids[:, -new.shape[1] - 1:-new.shape[1]]
        return model_inputs
