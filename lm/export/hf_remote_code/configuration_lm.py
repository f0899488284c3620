"""`LMConfig`: the transformers config of a GPT trained with `lm`, a from-scratch PyTorch Lightning framework.

Its fields are `lm`'s `GPTConfig` (lm/model/config.py), resolved (no field left to a default): this file is
copied into an exported folder by `lm export --format hf` and must not import `lm`. The context cache of
`lm` is not part of an export (`context_cache` is always false here): the folder computes the network's own
softmax.
"""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig


class LMConfig(PretrainedConfig):
    """A decoder-only transformer with `lm`'s variants. Every argument has `GPTConfig`'s meaning:

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the sizes.
        num_key_value_heads: key/value heads (grouped-query attention); None: num_attention_heads.
        intermediate_size: the MLP's hidden width (4 x hidden for gelu/relu2 unless set).
        max_position_embeddings: the longest sequence the model accepts (its training context).
        dropout, attention_dropout, embedding_dropout: training-time only (identity in eval mode).
            (lm's other training-time rates, token_noise and stochastic_depth, are not applied by this code.)
        bias: biases in linear layers and LayerNorm.
        tie_embeddings: the LM head is the token embedding matrix.
        norm: `layernorm` or `rmsnorm`; norm_eps: their epsilon (also QK-norm's).
        position: `learned`, `sinusoidal` or `rope`; rope_base: RoPE's frequency base.
        activation: `gelu` (tanh approximation), `relu2` (relu(x)^2) or `swiglu`.
        qk_norm: RMS-normalize queries and keys per head.
        logit_softcap: logits = cap * tanh(logits / cap); None: plain logits.
        residual_scalars: each block reads residual_scale * x + embedding_scale * x0 (x0: the embedding).
        value_embeddings: n extra token tables (vocab x kv heads x head size) added to the attention values,
            v + value_embedding_scale * table[token]; table j serves layer j and layer L - n + j. 0: none.
        bigram_embedding: rows of a hashed bigram table added to the input embedding, row
            (36313 * token xor 27191 * previous token) mod (rows - 1), the last row where there is no previous
            token. 0: none.
        smear: add smear_lambda * sigmoid(smear_gate . e_t[:24]) * e_{t-1} (the previous token's embedding) to
            each token's embedding e_t.
    """

    model_type = "lm_gpt"

    def __init__(self, vocab_size: int = 8192, hidden_size: int = 384, num_hidden_layers: int = 6,
                 num_attention_heads: int = 6, num_key_value_heads: Optional[int] = None,
                 intermediate_size: Optional[int] = None, max_position_embeddings: int = 256,
                 dropout: float = 0.0, attention_dropout: Optional[float] = None, embedding_dropout: float = 0.0,
                 bias: bool = True, tie_embeddings: bool = True, norm: str = "layernorm", norm_eps: float = 1e-5,
                 position: str = "learned", rope_base: float = 10000.0, activation: str = "gelu",
                 qk_norm: bool = False, logit_softcap: Optional[float] = None, residual_scalars: bool = False,
                 value_embeddings: int = 0, bigram_embedding: int = 0, smear: bool = False, init_std: float = 0.02, use_cache: bool = True, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        if intermediate_size is None:  # GPTConfig's defaults: SwiGLU 8/3 x hidden rounded up to 64, else 4 x hidden
            intermediate_size = 64 * -(-(8 * hidden_size // 3) // 64) if activation == "swiglu" else 4 * hidden_size
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.embedding_dropout = embedding_dropout
        self.bias = bias
        self.tie_embeddings = tie_embeddings
        self.norm = norm
        self.norm_eps = norm_eps
        self.position = position
        self.rope_base = rope_base
        self.activation = activation
        self.qk_norm = qk_norm
        self.logit_softcap = logit_softcap
        self.residual_scalars = residual_scalars
        self.value_embeddings = value_embeddings
        self.bigram_embedding = bigram_embedding
        self.smear = smear
        self.init_std = init_std
        self.use_cache = use_cache
        # The model ties (or not) by itself: a tied model has no lm_head module, so transformers has nothing to tie.
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)
        for name, choices in (("norm", ("layernorm", "rmsnorm")), ("position", ("learned", "sinusoidal", "rope")),
                              ("activation", ("gelu", "relu2", "swiglu"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"LMConfig.{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if hidden_size % num_attention_heads or num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} must divide hidden_size={hidden_size}, and "
                             f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads.")
        if not 0 <= value_embeddings <= num_hidden_layers:
            raise ValueError(f"value_embeddings must be between 0 and num_hidden_layers={num_hidden_layers}, "
                             f"got {value_embeddings}.")
        if bigram_embedding < 0 or bigram_embedding == 1:
            raise ValueError(f"bigram_embedding must be 0 (none) or at least 2 rows, got {bigram_embedding}.")

    @property
    def reads_previous_token(self) -> bool:
        """Whether a position's input depends on the token before it (bigram_embedding, smear)."""
        return bool(self.bigram_embedding) or bool(self.smear)

    def value_embedding_tables(self, layer_idx: int) -> tuple[int, ...]:
        """The value-embedding tables layer `layer_idx` adds to its values (lm's GPTConfig.value_embedding_tables):
        table j serves layer j and layer L - n + j."""
        n, L = self.value_embeddings, self.num_hidden_layers
        tables = [layer_idx] if layer_idx < n else []
        if layer_idx >= L - n and layer_idx - (L - n) not in tables:
            tables.append(layer_idx - (L - n))
        return tuple(tables)
