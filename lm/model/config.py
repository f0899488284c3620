"""`GPTConfig`: every architectural choice of the transformer is one field here.

A variant (RMSNorm, RoPE, SwiGLU, grouped-query attention, QK-norm, ...) is a config value, so it can
be chosen from an experiment YAML (`model.config.norm: rmsnorm`) and is saved with every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Optional

from lm.errors import LMError

Norm = Literal["layernorm", "rmsnorm"]
Position = Literal["learned", "sinusoidal", "rope"]
Activation = Literal["gelu", "swiglu", "relu2"]
AttentionImpl = Literal["sdpa", "math"]


@dataclass
class GPTConfig:
    """Shape and variant choices of a decoder-only transformer.

    Args:
        vocab_size: Rows of the token embedding and columns of the LM head. Linked to the data's
            `vocab_size` by the CLI, so it is never typed twice.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Query heads; must divide `hidden_size`.
        num_key_value_heads: Key/value heads for grouped-query attention; 1 is multi-query attention.
            Must divide `num_attention_heads`. `None`: `num_attention_heads` (multi-head attention).
        intermediate_size: Hidden width of the MLP. `None`: 4 x hidden for GELU, and for SwiGLU 8/3 x
            hidden rounded up to a multiple of 64 (the GELU MLP's parameter count).
        max_position_embeddings: Longest sequence (prompt + generated tokens) the model accepts.
        dropout: Dropout on embeddings and residual branches (and attention probabilities, unless
            `attention_dropout` says otherwise).
        attention_dropout: Dropout on attention probabilities; `None`: `dropout`. 0 keeps the fused SDPA
            kernel on CPU (dropout inside attention falls back to the slower math kernel there).
        embedding_dropout: In training, drop whole token *types* from the input embedding: each step every
            vocabulary entry is dropped with this probability, and all its occurrences in the batch read a
            zero vector (the rest are scaled by 1 / (1 - p)). AWD-LSTM's embedding dropout (Merity et al.
            2018): a word's vector cannot be memorized together with its contexts, so a small corpus is
            learned from the surrounding words too. The LM head (tied or not) is never dropped. 0: off.
        bias: Biases in linear layers and LayerNorm.
        tie_embeddings: Share the token embedding matrix with the LM head.
        norm: `layernorm` or `rmsnorm`.
        norm_eps: Epsilon of every normalization layer.
        position: `learned` absolute, fixed `sinusoidal` absolute, or `rope` (rotary, relative).
        rope_base: Base of the rotary frequencies (10000 in RoFormer/LLaMA; larger for long context).
        activation: `gelu` MLP (GPT-2), `swiglu` gated MLP (LLaMA) or `relu2`: relu(x)^2 in the GELU MLP's
            place (Primer, So et al. 2021; the modded-nanoGPT speedruns): sparse, cheap, often learns faster.
        qk_norm: RMS-normalize queries and keys per head before attention (stabilizes training).
        attention: `sdpa` (torch's fused scaled_dot_product_attention) or `math` (written out;
            same output, useful for reading and for inspecting attention).
        init_std: Standard deviation of the normal init of linear and embedding weights.
        zero_init_residual: Start the output projection of every attention and MLP at zero, so each block
            begins as the identity and the residual stream is the embedding (instead of GPT-2's
            N(0, std / sqrt(2 * layers))).
        logit_softcap: If set, logits = cap * tanh(logits / cap) (Gemma 2): bounds the logits smoothly,
            so no token gets an extreme score early in training. `None`: plain logits.
        residual_scalars: Two learned scalars per block (the modded-nanoGPT speedruns): before each block
            the stream becomes `residual_scale * x + embedding_scale * x0`, where x0 is the (dropped-out)
            embedding the first block read. They start at 1 and 0 (the plain residual stream), so a deep
            block can keep reading the tokens themselves and each block can weigh the stream it gets.
        value_embeddings: Number n of value-embedding tables (the modded-nanoGPT speedruns): extra token
            tables of vocab_size x (num_key_value_heads x head_dim) whose row of the current token is added to
            the attention values, `v = v + value_embedding_scale * table[token]` (one learned scalar per layer,
            starting at 1). Table j serves layer j and layer L - n + j (U-net style: the first n and the last
            n layers share them); a layer in both ranges (n > L / 2) adds both of its tables, and with n = L
            each layer i reads table i alone. The values then carry the token's identity directly, a cheap
            path for copying and recognizing tokens that the residual stream no longer has to keep. Costs a
            lookup per table (no matmul) and vocab_size x kv_size parameters per table. 0 <= n <=
            num_hidden_layers; 0: off.
        bigram_embedding: Rows of a hashed bigram table (the modded-nanoGPT speedruns): the first block reads
            embed(x_t) + bigram[hash(x_{t-1}, x_t)], with hash = (36313 * x_t xor 27191 * x_{t-1}) mod (rows - 1)
            and the last row reserved for "no previous token" (a sequence's first token, or a left-padded row's first
            real one). A direct, cheap (a lookup, no matmul) path for what a token pair means, which the attention
            otherwise has to assemble. The table starts at zero, so training starts as the plain model (a lookup
            table gets gradient at zero, unlike a weight matrix behind a nonlinearity). 0: off; else >= 2.
        smear: nanochat's "smear" (from the modded-nanoGPT speedruns): each position's token embedding gets a gated
            fraction of the previous token's, e_t + smear_lambda * sigmoid(smear_gate . e_t[:24]) * e_{t-1}, a
            cheap "previous token" feature that otherwise takes an attention head. smear_lambda starts at 0 (the
            plain model) and the gate at small positive weights, as in nanochat.
        token_noise: In training, replace each input token with probability p by a token drawn from the batch's
            own tokens (so from its unigram distribution): unigram noising (Xie et al. 2017, "Data Noising as
            Smoothing in Neural Network Language Models"). The targets are unchanged, so the model cannot lean on
            any single context token being right, and a small corpus's exact sequences are harder to memorize.
            0: off.
        stochastic_depth: In training, drop each block's attention and MLP branches (each on its own) for a whole
            sequence with a probability that rises linearly with depth from 0 (the first block) to this rate (the
            last): stochastic depth (Huang et al. 2016), a regularizer that trains an ensemble of shallower networks
            sharing weights. Kept branches are scaled by 1 / (1 - p); evaluation and generation use every block as
            is, so the trained weights serve every verb unchanged. 0: off.
        context_cache: Opt into the context cache extension (lm/model/context_cache.py; `build_gpt` then makes
            a `GPTWithContextCache`): a copy distribution over the window's earlier tokens mixed into the
            softmax on request (a neural cache, Grave et al. 2017, limited to the model's own context), with
            a softmax temperature, both calibrated on the validation text whenever `lm fit` validates.
            Training and the network's own figures are unchanged; the mixture's are `val/cache_*`.
    """

    vocab_size: int = 8192
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: int = 256
    dropout: float = 0.0
    attention_dropout: Optional[float] = None
    embedding_dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    position: Position = "learned"
    rope_base: float = 10000.0
    activation: Activation = "gelu"
    qk_norm: bool = False
    attention: AttentionImpl = "sdpa"
    init_std: float = 0.02
    zero_init_residual: bool = False
    logit_softcap: Optional[float] = None
    residual_scalars: bool = False
    value_embeddings: int = 0
    bigram_embedding: int = 0
    smear: bool = False
    token_noise: float = 0.0
    stochastic_depth: float = 0.0
    context_cache: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise LMError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise LMError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}: "
                f"every head gets hidden_size / num_attention_heads channels. Pick a divisor of {self.hidden_size} "
                f"(e.g. {_divisors_near(self.hidden_size, self.num_attention_heads)})."
            )
        kv_heads = self.resolved_value("num_key_value_heads")
        if kv_heads <= 0 or self.num_attention_heads % kv_heads:
            raise LMError(
                f"num_key_value_heads={kv_heads} must be a positive divisor of "
                f"num_attention_heads={self.num_attention_heads} (each key/value head serves a group of query heads)."
            )
        if self.position == "rope" and self.head_dim % 2:
            raise LMError(f"position='rope' needs an even head size, got {self.head_dim}.")
        if self.resolved_value("intermediate_size") <= 0:
            raise LMError(f"intermediate_size must be positive, got {self.intermediate_size}.")
        # `not (x > 0)` rather than `x <= 0`: NaN fails every comparison, and a NaN here was NaN logits, silently
        if self.logit_softcap is not None and not (math.isfinite(self.logit_softcap) and self.logit_softcap > 0):
            raise LMError(f"logit_softcap must be positive (or null for none), got {self.logit_softcap}.")
        for name in ("norm_eps", "rope_base"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise LMError(f"{name} must be a positive number, got {getattr(self, name)}.")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise LMError(f"init_std must be a number >= 0 (the std of the initial weights), got {self.init_std}.")
        if not 0 <= self.value_embeddings <= self.num_hidden_layers:
            raise LMError(f"value_embeddings must be between 0 (off) and num_hidden_layers={self.num_hidden_layers} "
                          f"(table j serves layer j and layer L - n + j), got {self.value_embeddings}.")
        if self.bigram_embedding < 0 or self.bigram_embedding == 1:
            raise LMError(f"bigram_embedding is the number of rows of the hashed bigram table: 0 (off) or at least 2 "
                          f"(one row is reserved for \"no previous token\"; e.g. 4096), got {self.bigram_embedding}.")
        for name in ("dropout", "attention_dropout", "embedding_dropout", "token_noise", "stochastic_depth"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise LMError(f"{name} must be in [0, 1), got {value}.")

    # A field left None means "this variant's default". The config itself keeps the None (it is what the
    # user chose, and a default instance must not freeze derived sizes: the CLI merges YAML overrides
    # into it); `resolved()` is the copy the model is built from, with every such field filled in.
    def resolved_value(self, name: str) -> Any:
        value = getattr(self, name)
        if value is not None:
            return value
        if name == "num_key_value_heads":
            return self.num_attention_heads
        if name == "intermediate_size" and self.activation == "swiglu":  # 3 matrices of 8/3 h: 2 x 4h's parameters
            return 64 * -(-(8 * self.hidden_size // 3) // 64)
        if name == "intermediate_size":
            return 4 * self.hidden_size
        if name == "attention_dropout":
            return self.dropout
        return value

    def resolved(self) -> "GPTConfig":
        """A copy with every field that was left None (the variant's default) filled in."""
        return replace(self, **{f.name: self.resolved_value(f.name) for f in fields(self)})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def reads_previous_token(self) -> bool:
        """Whether a position's input depends on the token before it (bigram_embedding, smear): then a KV cache
        also keeps every position's token id, so a decode step can find its previous token."""
        return bool(self.bigram_embedding) or self.smear

    def value_embedding_tables(self, layer_idx: int) -> tuple[int, ...]:
        """The value-embedding tables layer `layer_idx` adds to its values: table j serves layer j (the first n
        layers) and layer L - n + j (the last n), U-net style; () for a layer in neither range."""
        n, L = self.value_embeddings, self.num_hidden_layers
        tables = [layer_idx] if layer_idx < n else []
        if layer_idx >= L - n and layer_idx - (L - n) not in tables:
            tables.append(layer_idx - (L - n))
        return tuple(tables)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, safe for `torch.load(weights_only=True)` in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LMError(f"Unknown GPTConfig keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)


def _divisors_near(n: int, k: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - k))[:3]
