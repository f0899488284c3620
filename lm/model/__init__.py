"""The hand-written transformer. Usable without Lightning:

    from lm.model import GPT, GPTConfig
    logits = GPT(GPTConfig(vocab_size=8192))(input_ids)   # (B, T, vocab)
"""

from lm.model.config import GPTConfig
from lm.model.gpt import GPT
from lm.model.layers import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
