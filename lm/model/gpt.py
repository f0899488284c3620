"""GPT: a decoder-only transformer written out by hand.

Notable features (each a `GPTConfig` value, see config.py):
- pre-norm residual blocks with LayerNorm or RMSNorm;
- learned, sinusoidal or rotary (RoPE) positions;
- multi-head, grouped-query or multi-query attention, optional QK-norm, fused SDPA or plain math;
- GELU, ReLU² or SwiGLU MLP; tied or untied embeddings; bias on/off; dropout (and AWD-LSTM's dropout of
  whole token types from the input embedding); optional logit soft-capping;
- optional learned residual scalars: each block reads a learned mix of the stream and the embedding;
- optional value embeddings: extra token tables added to the attention values of the first and last layers;
- optional input levers that read the previous token: a hashed bigram table and nanochat's gated "smear" of
  the previous token's embedding (the KV cache then keeps the token ids, so decoding matches the full forward);
- GPT-2 initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers) so the
  residual stream's variance does not grow with depth (or zero, so every block starts as the identity);
- a preallocated KV cache for generation (prefill once, then one token per step);
- `prepare_for_inference()`: CPU decode speed-ups (faster linear routes, a compiled decode step),
  kept out of the model in inference.py;
- `activation_checkpointing`: a memory choice of a training run, not of the architecture (so not a
  `GPTConfig` field): each block's activations are recomputed in the backward pass instead of kept.

`GPT(config)(input_ids)` returns logits of shape (batch, time, vocab). No Lightning here. The context
cache is an extension built on top of this class (context_cache.py: `GPTWithContextCache`, chosen by
`build_gpt` when `config.context_cache` is set); nothing here knows of it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lm.errors import LMError
from lm.model import inference
from lm.model.config import GPTConfig
from lm.model.layers import (SMEAR_GATE_CHANNELS, Block, CausalSelfAttention, Dropout, KVCache, LearnedPositions,
                             RotaryPositions, SinusoidalPositions, bigram_hash, make_norm, previous_token_ids)


class GPT(nn.Module):
    """The transformer. `block_class` / `attention_class` swap in subclasses of `Block` /
    `CausalSelfAttention` (same constructor arguments) without copying this class."""

    decode_step = None  # the compiled forward, set by prepare_for_inference(compile=True)
    accepts_context_cache = False  # True in the extension that implements `config.context_cache`
    # Recompute each block in the backward pass instead of keeping its activations (training only): the
    # activations kept drop from every block's to each block's input plus one block's. Set per run
    # (`LanguageModel(activation_checkpointing=True)`, or on the instance); the weights do not change.
    activation_checkpointing = False

    def __init__(self, config: GPTConfig, block_class: type[Block] = Block,
                 attention_class: type[CausalSelfAttention] = CausalSelfAttention):
        super().__init__()
        if config.context_cache and not self.accepts_context_cache:
            raise LMError("config.context_cache is set but GPT is the plain network: build it with "
                          "lm.model.build_gpt(config, ...) (same arguments), which adds the context cache.")
        self.config = config = config.resolved()  # None fields -> the variant's defaults
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Absolute positions are added to the embeddings; rotary ones are applied inside attention.
        self.embed_positions = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(
            config.position, lambda _: None
        )(config)
        self.rotary = RotaryPositions(config) if config.position == "rope" else None
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(block_class(config, i, attention_class) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        # Made after the others, with the random state restored after their init: every other weight, and what the
        # run draws later, is as without them (a screen compares like with like).
        with torch.random.fork_rng(devices=[]):
            self._add_input_levers(config)
            self._add_value_embeddings(config)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = 0.0 if self.config.zero_init_residual else std / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def _add_value_embeddings(self, config: GPTConfig) -> None:
        """The value-embedding tables (config.value_embeddings; an empty list when off, so no state-dict key), looked
        up once per forward, their rows handed to the layers they serve (config.value_embedding_tables). N(0, init_std)
        like the token embedding: a row is then sqrt(hidden) times smaller than a fresh v (x W_v with x of unit RMS;
        16x at hidden 256), so training starts close to the plain model, while the layers' scales already get
        gradient (modded-nanoGPT's later records zero the tables and weigh v and the rows 0.5 each; here v keeps its
        weight, see CausalSelfAttention)."""
        kv_size = config.num_key_value_heads * config.head_dim
        self.value_embeddings = nn.ModuleList(nn.Embedding(config.vocab_size, kv_size)
                                              for _ in range(config.value_embeddings))
        for table in self.value_embeddings:
            nn.init.normal_(table.weight, mean=0.0, std=config.init_std)

    def _add_input_levers(self, config: GPTConfig) -> None:
        """The input levers that read the previous token (config.bigram_embedding, config.smear; absent when off, so
        no state-dict key), used by `_add_previous_token`. The bigram table starts at zero and smear_lambda at 0:
        training starts as the plain model (a lookup table, and a scalar in front of a product, still get gradient
        there). The smear gate starts at U(0, 0.02), nanochat's init. The gate is a bare (1, channels) Parameter, not
        an nn.Linear: the optimizer gives it AdamW without weight decay, like the other scalars (not decay or Muon)."""
        if config.bigram_embedding:
            self.bigram_embedding = nn.Embedding(config.bigram_embedding, config.hidden_size)
            nn.init.zeros_(self.bigram_embedding.weight)
        if config.smear:
            self.smear_gate = nn.Parameter(torch.empty(1, min(SMEAR_GATE_CHANNELS, config.hidden_size)))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
            nn.init.uniform_(self.smear_gate, 0.0, 0.02)

    def forward(self, input_ids: Tensor, kv_cache: Optional[KVCache] = None,
                position_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T).

        Args:
            input_ids: token ids.
            kv_cache: if given, `input_ids` continue the cached sequence: they are written to the cache
                and attend to everything in it.
            position_ids: (B, T) positions, for left-padded batches; default `past + arange(T)`.
            attention_mask: (B, past + T) with 1 for real tokens, 0 for padding keys to ignore.
            return_hidden: return the final-norm hidden states (B, T, hidden) instead of logits: the
                features a task head (e.g. a classifier) reads.
        """
        if input_ids.dim() != 2:
            raise LMError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}.")
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise LMError(
                f"Sequence of {past + T} tokens is longer than max_position_embeddings="
                f"{self.config.max_position_embeddings}: shorten the prompt (or truncate it from the left), "
                f"or use a model trained with a longer context."
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        if self.training and self.config.token_noise > 0:
            input_ids = self._noised_tokens(input_ids)
        x = self.embed_tokens(input_ids)
        keep_scale = None
        if self.training and self.config.embedding_dropout > 0:
            keep_scale = self._embedding_keep_scale(input_ids)
            x = x * keep_scale
        if self.config.reads_previous_token:
            x = self._add_previous_token(x, input_ids, keep_scale, kv_cache, attention_mask)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        x = self.dropout(x)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        x0 = x if self.config.residual_scalars else None  # blocks mix the embedding back in (residual_scalars)
        value_embeddings = self._value_embeddings(input_ids, keep_scale)
        recompute = self.activation_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()
        for block, value_embedding in zip(self.layers, value_embeddings):
            extra = {"x0": x0} if x0 is not None else {}  # only then: a custom block may not take x0
            if value_embedding is not None:  # likewise
                extra["value_embedding"] = value_embedding
            if recompute:
                # Non-reentrant: the variant torch recommends, which replays autocast and traces under
                # torch.compile (tests/test_memory_levers.py). preserve_rng_state restores the RNG before
                # the recomputation, so its dropout masks are the forward's: the gradients are those
                # without checkpointing.
                x = checkpoint(block, x, rotary, kv_cache, attention_mask, use_reentrant=False,
                               preserve_rng_state=True, **extra)
            else:
                x = block(x, rotary, kv_cache, attention_mask, **extra)
        if kv_cache is not None:
            if kv_cache.token_ids is not None:  # the next step's previous token (bigram_embedding, smear)
                kv_cache.token_ids[:, past:past + T] = input_ids
            kv_cache.length += T
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    def head(self, hidden: Tensor) -> Tensor:
        """The LM head's logits (B, T, vocab) for final hidden states (what `forward` returns)."""
        logits = self.lm_head(hidden)
        if self.config.logit_softcap is not None:  # smooth bound: cap * tanh(logits / cap)
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    def _value_embeddings(self, input_ids: Tensor, keep_scale: Optional[Tensor]) -> list[Optional[Tensor]]:
        """Each layer's value-embedding rows (B, T, kv_size) of `input_ids`, None for a layer without a table.
        Each table is looked up once; a layer served by two tables (value_embeddings > layers / 2) gets their sum.
        `keep_scale`: embedding dropout's factors, applied as to the input embedding, so a token type dropped
        this step cannot be read from the value tables either (they are a second copy of its identity)."""
        if not len(self.value_embeddings):
            return [None] * len(self.layers)
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

    def _add_previous_token(self, x: Tensor, input_ids: Tensor, keep_scale: Optional[Tensor],
                            kv_cache: Optional[KVCache], attention_mask: Optional[Tensor]) -> Tensor:
        """The token embeddings `x` (B, T, hidden) with the input levers that read the previous token:
        - smear (nanochat's; modded-nanoGPT's is the same with 12 gate channels): x_t + smear_lambda *
          sigmoid(smear_gate . x_t[:24]) * x_{t-1}, x_{t-1} the previous token's embedding before smearing;
        - bigram_embedding: + the hashed bigram table's row of (x_{t-1}, x_t).
        The previous token of a sequence's first position (or a left-padded row's first real one) is "none": no
        smear, the bigram table's reserved row. With a KV cache it is the cached id of the column before.
        `keep_scale`: embedding dropout's factors (the previous token's ride along with its embedding)."""
        previous = previous_token_ids(input_ids, kv_cache, attention_mask)
        if self.config.smear:
            first = self.embed_tokens(previous[:, :1].clamp(min=0))  # a cached token's embedding (eval: no dropout)
            # The gate reads a copy of its channels: a view would keep all of x alive for the backward pass.
            gate_input = x[..., :self.smear_gate.shape[1]].contiguous()
            gate = self.smear_lambda * torch.sigmoid(F.linear(gate_input, self.smear_gate))
            gate = gate * (previous >= 0).unsqueeze(-1).to(gate.dtype)  # no previous token: nothing to smear
            x = x + gate * torch.cat([first, x[:, :-1]], dim=1)  # keeps this (B, T, hidden) tensor for backward
        if self.config.bigram_embedding:
            rows = self.bigram_embedding(bigram_hash(previous, input_ids, self.config.bigram_embedding))
            x = x + (rows * keep_scale if keep_scale is not None else rows)
        return x

    def _noised_tokens(self, input_ids: Tensor) -> Tensor:
        """`input_ids` with each token replaced, with probability `token_noise`, by a token of the batch drawn
        at random (a draw from the batch's unigram distribution, with no frequency table to keep)."""
        replace = torch.rand(input_ids.shape, device=input_ids.device) < self.config.token_noise
        donors = input_ids.flatten()[torch.randint(0, input_ids.numel(), input_ids.shape, device=input_ids.device)]
        return torch.where(replace, donors, input_ids)

    def _embedding_keep_scale(self, input_ids: Tensor) -> Tensor:
        """(B, T, 1) factors of `embedding_dropout`: 0 for the token types dropped this step, 1 / (1 - p)
        for the others. One draw per vocabulary entry, so every occurrence of a dropped type is dropped."""
        keep = 1.0 - self.config.embedding_dropout
        weight = self.embed_tokens.weight
        scale = torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype).bernoulli_(keep) / keep
        return scale[input_ids].unsqueeze(-1)

    def prepare_for_inference(self, compile: bool = False) -> "GPT":
        """Faster CPU decoding, logits unchanged to float rounding (see lm/model/inference.py); returns
        the model. `compile=True` also compiles the step `decode` runs. Training it stays correct."""
        return inference.prepare_for_inference(self, compile=compile)

    def decode(self, input_ids: Tensor, kv_cache: KVCache, position_ids: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None, **forward_options) -> Tensor:
        """`forward` for generation's one-token steps: compiled after `prepare_for_inference(compile=True)`."""
        step = self.decode_step or self.forward
        return step(input_ids, kv_cache=kv_cache, position_ids=position_ids, attention_mask=attention_mask,
                    **forward_options)

    def new_kv_cache(self, batch_size: int, max_length: Optional[int] = None) -> KVCache:
        """An empty cache on the model's device and dtype."""
        weight = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_length, device=weight.device, dtype=weight.dtype)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head is counted once); optionally without embedding tables (token,
        learned position and value-embedding tables: lookups, no matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            n -= sum(table.weight.numel() for table in self.value_embeddings)
            if self.config.bigram_embedding:
                n -= self.bigram_embedding.weight.numel()
            if isinstance(self.embed_positions, LearnedPositions):
                n -= self.embed_positions.embedding.weight.numel()
        return n

    def flops_per_token(self, sequence_length: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus the attention
        scores, 12 * layers * hidden * T (PaLM appendix B). Used for MFU."""
        T = sequence_length or self.config.max_position_embeddings
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * T
