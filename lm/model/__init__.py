"""The hand-written transformer and its generation API. Usable without Lightning:

    from lm.model import GPT, GPTConfig, generate
    model = GPT(GPTConfig(vocab_size=8192))
    logits = model(input_ids)                                  # (B, T, vocab)
    ids = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)

Generation is split by job: sampling.py (SamplingOptions, sampling), decoder.py (Decoder: the decode
engine that `generate*`, `stream_*` and `lm serve` all run), text_stream.py (TextAssembler: UTF-8 safe
pieces, stop strings), generation.py (the token and text API).
"""

from lm.model.config import GPTConfig
from lm.model.context_cache import ContextKVCache, GPTWithContextCache, build_gpt
from lm.model.decoder import Decoder
from lm.model.generation import generate, generate_text, stream_generate, stream_text
from lm.model.gpt import GPT
from lm.model.layers import KVCache
from lm.model.sampling import SamplingOptions, filter_logits, sample_next_token
from lm.model.text_stream import TextAssembler

__all__ = [
    "GPT",
    "GPTConfig",
    "build_gpt",
    "GPTWithContextCache",
    "ContextKVCache",
    "KVCache",
    "SamplingOptions",
    "generate",
    "stream_generate",
    "generate_text",
    "stream_text",
    "sample_next_token",
    "filter_logits",
    "Decoder",
    "TextAssembler",
]
