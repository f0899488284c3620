"""The hand-written transformer and its generation loop. Usable without Lightning:

    from lm.model import GPT, GPTConfig, generate
    model = GPT(GPTConfig(vocab_size=8192))
    logits = model(input_ids)                                  # (B, T, vocab)
    ids = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
"""

from lm.model.config import GPTConfig
from lm.model.generate import (
                               SamplingOptions,
                               filter_logits,
                               generate,
                               generate_text,
                               sample_next_token,
                               stream_generate,
                               stream_text,
)
from lm.model.gpt import GPT
from lm.model.layers import KVCache

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "SamplingOptions",
    "generate",
    "stream_generate",
    "generate_text",
    "stream_text",
    "sample_next_token",
    "filter_logits",
]
