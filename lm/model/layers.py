"""Building blocks of the transformer: norms, positions, MLPs, attention and the KV cache.

Each block reads its variant from `GPTConfig`, so `gpt.py` only stacks them. Nothing here imports
Lightning.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.errors import LMError
from lm.model.config import GPTConfig


# --------------------------------------------------------------------------------------- norms
def make_norm(config: GPTConfig, size: Optional[int] = None) -> nn.Module:
    size = size or config.hidden_size
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


# ------------------------------------------------------------------------------------- dropout
class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same module tree and state dict) whose CPU training masks cost a quarter of the
    random numbers: each 64-bit draw of torch's generator gives four 16-bit lanes, and an element is kept when
    its lane is below (1 - p) x 65536, rounded. `bernoulli_` spends one draw per element, and on a small model
    its masks were 7-8% of a training step (the default recipe, bf16 autocast, Zen 4; 4 ms -> 1 ms per mask of
    2,048 x 256). The keep probability is exact to 1/65536 and the scale is its inverse, so E[out] = x.

    The masks come from the global CPU generator, so seeds and activation checkpointing (which restores that
    generator's state before recomputing) behave as with `nn.Dropout`; the stream differs, so a run's losses
    are not those of `nn.Dropout` for the same seed. On other devices, and under torch.compile (whose fused
    kernels draw their own random numbers fast), it is `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if (not self.training or self.p == 0.0 or self.p >= 1.0 or self.inplace or x.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return x * cpu_dropout_mask(x.shape, self.p, x.dtype)


def cpu_dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """A `shape` tensor of 0 and 1 / keep (`dtype`), each element kept with probability keep = round((1 - p) x
    65536) / 65536, from 16-bit lanes of 64-bit draws of the global CPU generator."""
    lanes = math.prod(shape)
    threshold = round((1.0 - p) * 65536)
    draws = torch.empty((lanes + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    keep = draws.view(torch.int16)[:lanes].view(shape) < threshold - 32768  # int16 lanes: [-32768, 32767]
    return keep.to(dtype).mul_(65536 / threshold)


# ----------------------------------------------------------------------------------- positions
class LearnedPositions(nn.Module):
    """GPT-2's absolute position table, added to the token embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.embedding(position_ids)


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos table of "Attention Is All You Need"; no parameters, so it is a buffer."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(
            torch.arange(0, config.hidden_size, 2, dtype=torch.float32) * (-math.log(10000.0) / config.hidden_size)
        )
        table = torch.zeros(config.max_position_embeddings, config.hidden_size)
        table[:, 0::2] = torch.sin(positions * inv_freq)
        table[:, 1::2] = torch.cos(positions * inv_freq[: config.hidden_size // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.table[position_ids]


class RotaryPositions(nn.Module):
    """RoPE (Su et al. 2021): rotates query/key channel pairs by a position-dependent angle, so the
    attention score depends only on the relative distance. Returns (cos, sin) for `apply_rotary`."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
        # (T, dim/2) -> (T, dim) in the "rotate half" layout used by LLaMA.
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # (B, T) or (T,) -> broadcastable against (B, heads, T, head_dim)
        cos, sin = self.cos[position_ids], self.sin[position_ids]
        if position_ids.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# ------------------------------------------------------------------------------------------ MLP
class MLP(nn.Module):
    """GPT-2 feed-forward: up-projection, GELU (tanh approximation) or relu(x)^2, down-projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = Dropout(config.dropout)
        self.relu2 = config.activation == "relu2"

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.dropout(self.down_proj(h))


class SwiGLU(nn.Module):
    """LLaMA's gated feed-forward: down(silu(gate(x)) * up(x)). Gate and up share one matmul."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.down_proj.is_residual_projection = True
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))


def make_mlp(config: GPTConfig) -> nn.Module:
    return SwiGLU(config) if config.activation == "swiglu" else MLP(config)


# ------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    Preallocating (instead of `torch.cat` each step) keeps a decode step free of allocations that
    grow with the sequence. `length` counts the positions already written; `GPT.forward` advances it
    once all layers have written the new tokens.

    A model whose input reads the previous token (`GPTConfig.reads_previous_token`: bigram_embedding, smear)
    also gets `token_ids` (B, max_length), every position's input id, which `GPT.forward` writes: a step's
    previous token is the one in the column before it, and moves with the keys and values (`per_position`,
    `narrow`). None otherwise.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_length: Optional[int] = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_length = max_length or config.max_position_embeddings
        if max_length > config.max_position_embeddings:
            raise LMError(
                f"KV cache length {max_length} exceeds max_position_embeddings={config.max_position_embeddings}."
            )
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.length = 0
        self.token_ids: Optional[Tensor] = (torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
                                            if config.reads_previous_token else None)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values (B, kv_heads, T, head_dim) after the cached ones; return all of them."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise LMError(f"KV cache is full: {end} positions needed, {self.max_length} allocated.")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def per_position(self) -> list[tuple[Tensor, int]]:
        """Every tensor that holds one entry per row and position, with its position dimension: here keys and
        values (B, kv_heads, positions, head_dim); a subclass adds its own. For code that moves positions or
        rows around (`lm.model.decoder.Decoder`)."""
        token_ids = [(self.token_ids, 1)] if self.token_ids is not None else []
        return [(t, 2) for t in (*self.keys, *self.values)] + token_ids

    def narrow(self, rows: slice, start: int, length: Optional[int] = None) -> "KVCache":
        """A cache that shares this one's memory: rows `rows`, positions `start`.. (its position 0 is this
        one's `start`), `length` of them written (default: those this cache has past `start`). What a
        forward writes into it lands here; its own `length` advances, this one's does not."""
        view = copy.copy(self)  # the same class, so a subclass's extra per-position tensors are narrowed below
        view.keys = [k[rows, :, start:] for k in self.keys]
        view.values = [v[rows, :, start:] for v in self.values]
        view.token_ids = self.token_ids[rows, start:] if self.token_ids is not None else None
        view.max_length = self.max_length - start
        view.length = max(self.length - start, 0) if length is None else length
        return view


# --------------------------------------------------------------------------------- input levers
NO_PREVIOUS_TOKEN = -1  # `previous_token_ids` for a position with no token before it
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many leading channels of the embedding (nanochat's 24)


def previous_token_ids(input_ids: Tensor, kv_cache: Optional[KVCache] = None,
                       attention_mask: Optional[Tensor] = None) -> Tensor:
    """(B, T) id of the token before each of `input_ids` (B, T), `NO_PREVIOUS_TOKEN` where there is none: a
    sequence's first token, and a left-padded row's first real one (`attention_mask` (B, past + T), 0 for padding,
    says the column before it is padding). With a KV cache, the token before the first new one is the cached
    `token_ids` column before them."""
    B, T = input_ids.shape
    past = kv_cache.length if kv_cache is not None else 0
    if past > 0:
        if kv_cache.token_ids is None:
            raise LMError("This KV cache keeps no token ids, but the model reads the previous token "
                          "(bigram_embedding / smear): make the cache with the model's new_kv_cache().")
        first = kv_cache.token_ids[:, past - 1:past]
    else:
        first = torch.full((B, 1), NO_PREVIOUS_TOKEN, dtype=input_ids.dtype, device=input_ids.device)
    previous = torch.cat([first, input_ids[:, :-1]], dim=1)
    if attention_mask is not None:  # column past + t - 1 precedes token t: if it is padding there is no previous token
        real = attention_mask[:, :past + T].bool()
        real_before = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)  # column j: is j - 1 real?
        previous = previous.masked_fill(~real_before[:, past:], NO_PREVIOUS_TOKEN)
    return previous


def bigram_hash(previous_ids: Tensor, input_ids: Tensor, rows: int) -> Tensor:
    """Row of the hashed bigram table (`GPTConfig.bigram_embedding` rows) for each (previous, current) token pair:
    (36313 * current xor 27191 * previous) mod (rows - 1), the modded-nanoGPT speedruns' mix (in int64, so no
    wrap-around), and the reserved last row where there is no previous token. Deterministic; the exported model's
    code (lm/export/hf_remote_code/modeling_lm.py) computes the same."""
    mixed = torch.bitwise_xor(36313 * input_ids, 27191 * previous_ids.clamp(min=0)) % (rows - 1)
    return torch.where(previous_ids == NO_PREVIOUS_TOKEN, rows - 1, mixed)


# ------------------------------------------------------------------------------------ attention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads, optional QK-norm and RoPE.

    One fused projection produces queries, keys and values (one matmul instead of three). With a
    KV cache, only the new tokens are projected and they attend to every cached position.

    A layer served by value-embedding tables (`GPTConfig.value_embeddings`) adds
    `value_embedding_scale * value_embedding` to its values before they are attended to (and cached, so a
    decode step needs only its own token's rows). The scale starts at 1: modded-nanoGPT's
    `0.5 * v + 0.5 * ve` weighs the two equally, and keeping v's own weight at 1 leaves layers without a
    table exactly as they were (the common factor is the output projection's to learn).
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.impl = config.attention
        self.dropout_p = config.attention_dropout
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.o_proj.is_residual_projection = True
        self.resid_dropout = Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        if config.value_embedding_tables(layer_idx):
            self.value_embedding_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]] = None,
                kv_cache: Optional[KVCache] = None, attention_mask: Optional[Tensor] = None,
                value_embedding: Optional[Tensor] = None) -> Tensor:
        """`value_embedding`: (B, T, kv_heads x head_dim), this layer's value-embedding rows of the input tokens
        (`GPT.forward` passes them to the layers that have tables)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if value_embedding is not None:  # in v's dtype: under autocast the table rows are fp32, v bf16
            ve = value_embedding.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v + (self.value_embedding_scale * ve).to(v.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)

        mask = causal_mask(T, past, attention_mask, x.device)  # None means "plain causal"
        y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(y))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """softmax(q k^T / sqrt(d)) v for q (B, heads, T, d) and k, v (B, kv_heads, S, d), S >= T.

        `mask` (T, S) or (B, 1, T, S), True = may attend; None means causal with the queries at the
        last T positions. The place to override for a new attention rule (see `lm` README, "Extending").
        """
        dropout_p = self.dropout_p if self.training else 0.0
        T, S = q.shape[-2], k.shape[-2]
        scores = q.shape[0] * q.shape[1] * T * S
        needs_grad = torch.is_grad_enabled() and q.requires_grad
        if (self.impl == "sdpa" and mask is None and dropout_p == 0.0
                and causal_attention_in_halves_is_faster(q, k, needs_grad)):
            return causal_attention_in_halves(q, k, v)
        if self.impl == "sdpa" and not written_out_attention_is_faster(q.device.type, q.dtype, scores, needs_grad):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p,
                is_causal=mask is None and T > 1, enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return math_attention(q, k, v, mask, dropout_p)


# Largest attention (batch x heads x queries x keys scores, one layer) that `written_out_attention_is_faster` lets the
# written-out path take: autograd keeps 6 bytes a score there (the fp32 softmax and its bf16 cast), 48 MiB at most.
WRITTEN_OUT_ATTENTION_MAX_SCORES = 2 ** 23


def written_out_attention_is_faster(device_type: str, dtype: torch.dtype, scores: int, needs_grad: bool) -> bool:
    """Whether `attention: sdpa` takes `math_attention` instead of torch's fused kernel: on CPU, in bf16, when a
    gradient is wanted and the scores are few (`WRITTEN_OUT_ATTENTION_MAX_SCORES`). torch's fused CPU kernel keeps
    no scores, but its bf16 backward pass is slow: per layer, forward + backward, 8 x 4 heads x 256 x 64 took 24.5
    ms fused against 14.5 written out, 4 x 4 x 512 x 64 39.1 against 29.1 (Zen 4, 2 threads); in fp32, and in the
    forward pass alone, the fused kernel is as fast or faster (docs/results/figures.md, "The default recipe's
    training step"). `lm.plan.estimate` counts the scores' memory by the same rule."""
    return (device_type == "cpu" and dtype == torch.bfloat16 and needs_grad
            and scores <= WRITTEN_OUT_ATTENTION_MAX_SCORES)


def causal_attention_in_halves_is_faster(q: Tensor, k: Tensor, needs_grad: bool) -> bool:
    """Whether plain causal attention (no cache, no mask) takes `causal_attention_in_halves`: on CPU, without a
    gradient, for 384-767 queries of concrete size (not while torch.compile or torch.export trace symbolic shapes).

    torch's fused CPU kernel picks its query block by length: 64 rows below 768 queries, 256 from 768 on. Over
    384-767 queries, calling it per half (docs/results/eval-speed.md) measured faster at 512 (8 x 4 heads x 64
    channels, inference mode, Zen 4, 2 threads: bf16 16.4 -> 13.5 ms, fp32 17.4 -> 14.7 ms a layer), the same at
    256 and slower from 1,024 on, where the kernel's larger blocks already serve it."""
    T = q.shape[-2]
    return (q.device.type == "cpu" and not needs_grad and type(T) is int and 384 <= T < 768
            and k.shape[-2] == T and k.shape[1] == q.shape[1])


def causal_attention_in_halves(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of q, k, v (B, heads, T, d) as two fused calls: the first half of the queries on the first
    half of the keys (causal), the second half on all keys (a bottom-right causal mask). Each query sees exactly
    the keys plain causal attention gives it, in one softmax: the same output to rounding."""
    T = q.shape[-2]
    half = T // 2
    first = F.scaled_dot_product_attention(q[:, :, :half], k[:, :, :half], v[:, :, :half], is_causal=True)
    mask = causal_mask(T - half, half, None, q.device)  # the second half's queries after `half` earlier keys
    second = F.scaled_dot_product_attention(q[:, :, half:], k, v, attn_mask=mask)
    return torch.cat([first, second], dim=2)


def causal_mask(T: int, past: int, attention_mask: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """Boolean mask (True = may attend) for T new queries after `past` cached positions.

    Returns None for the two common cases SDPA handles without a mask: a fresh causal sequence, and
    a single decoding query (it may see every cached key). `attention_mask` (B, past + T), 1 for
    real tokens and 0 for (left) padding, hides padding keys; each query may always see itself so
    that a padding row never has an empty softmax (its output is ignored anyway).
    """
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    mask = torch.arange(S, device=device)[None, :] <= query_pos  # (T, S), bottom-right aligned
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
        diagonal = torch.arange(S, device=device)[None, :] == query_pos
        mask = (mask & keys) | diagonal
    return mask


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v written out; the reference the fused SDPA path must match."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves a group of query heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    # The mask as an additive fp32 bias (0 or -inf), added with the scale on the way to the fp32 softmax: one pass
    # over the scores fewer than masking them in place (bf16 training: 10-30% of this function's time).
    if mask is None:  # causal, the queries at the last T positions
        bias = torch.full((T, S), float("-inf"), device=q.device).triu_(S - T + 1)
    else:
        bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1])) + bias
    probs = F.dropout(torch.softmax(scores, dim=-1).type_as(q), p=dropout_p)
    return probs @ v


# --------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `residual_scalars` the block first mixes its input with the embedding `x0`:
    x = residual_scale * x + embedding_scale * x0 (learned, starting at 1 and 0). `value_embedding` (the
    layer's rows of `GPTConfig.value_embeddings` tables) goes on to the attention.
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0,
                 attention_class: type[CausalSelfAttention] = CausalSelfAttention):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = attention_class(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        if config.residual_scalars:
            self.residual_scale = nn.Parameter(torch.ones(()))
            self.embedding_scale = nn.Parameter(torch.zeros(()))
        # Stochastic depth: this block's share of config.stochastic_depth, 0 for the first block rising linearly
        # to the full rate for the last (Huang et al. 2016; timm's linspace): the first layers build the features
        # every later one reads, the last ones refine them.
        self.drop_path = config.stochastic_depth * layer_idx / max(config.num_hidden_layers - 1, 1)

    def forward(self, x: Tensor, rotary=None, kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                value_embedding: Optional[Tensor] = None) -> Tensor:
        if x0 is not None:
            x = self.residual_scale * x + self.embedding_scale * x0
        extra = {"value_embedding": value_embedding} if value_embedding is not None else {}  # a custom attention
        x = x + self._drop_path(self.attn(self.attn_norm(x), rotary, kv_cache, attention_mask, **extra))  # may not
        return x + self._drop_path(self.mlp(self.mlp_norm(x)))                                             # take it

    def _drop_path(self, branch: Tensor) -> Tensor:
        """In training, a residual branch's output zeroed for each sequence with probability `drop_path` (the
        others scaled by 1 / (1 - p), so its expectation is unchanged); as is otherwise."""
        p = self.drop_path
        if not self.training or p == 0.0:
            return branch
        keep = torch.empty((branch.shape[0],) + (1,) * (branch.dim() - 1), device=branch.device).bernoulli_(1.0 - p)
        return branch * (keep / (1.0 - p)).to(branch.dtype)
