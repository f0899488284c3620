"""Generation: greedy/sampling semantics, batching with left padding, stopping, context limits,
streaming, the `Decoder` every entry point runs (rows joining and leaving between steps), and the text
level (UTF-8 safety, stop strings) with the real byte-level tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lm.data.tokenizer import EOT, Tokenizer
from lm.errors import LMError
from lm.model import (GPT, Decoder, GPTConfig, SamplingOptions, build_gpt, filter_logits, generate, generate_text,
                      sample_next_token, stream_generate, stream_text)

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48)
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", num_key_value_heads=2, tie_embeddings=False,
             bias=False)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return build_gpt(GPTConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


def greedy_by_hand(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference: re-run the whole sequence, take the argmax, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


# -------------------------------------------------------------------------------- token level
@pytest.mark.parametrize("overrides", [{}, LLAMA], ids=["gpt2", "llama"])
def test_greedy_equals_argmax_by_hand(overrides):
    model = make_model(**overrides)
    prompt = [5, 17, 33, 2]
    expected = greedy_by_hand(model, prompt, 12)
    plain = SamplingOptions(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    assert generate(model, [prompt], plain)[0] == expected
    assert generate(model, [prompt], plain, use_cache=False)[0] == expected
    out = generate(model, torch.tensor([prompt]), plain)
    assert isinstance(out, torch.Tensor) and out.tolist() == [expected]


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=123)
    b = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=123)
    c = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=7)
    assert a == b
    assert a != c
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert generate(model, [[1]], max_new_tokens=10, generator=g1) == generate(model, [[1]], max_new_tokens=10, generator=g2)
    with pytest.raises(ValueError, match="seed in the sampling options or a generator"):
        generate(model, [[1]], max_new_tokens=2, seed=1, generator=g1)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[4, 8, 15]], max_new_tokens=15, temperature=0)
    assert generate(model, [[4, 8, 15]], max_new_tokens=15, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, [[4, 8, 15]], max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_top_k_and_top_p_never_sample_outside_the_allowed_set():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)

    def drawn(**kwargs) -> set[int]:
        return set(sample_next_token(logits, SamplingOptions(**{"temperature": 1.0, "top_k": None, **kwargs}), gen).tolist())

    assert drawn() == {0, 1, 2, 3, 4, 5}
    assert drawn(top_k=2) == {1, 3}
    assert drawn(top_k=3) == {1, 3, 4}
    assert drawn(top_p=0.5) == {1}          # the top token alone reaches 0.5
    assert drawn(top_p=0.75) == {1, 3}      # 0.5 < 0.75 <= 0.8
    assert drawn(top_p=0.85) == {1, 3, 4}   # 0.8 < 0.85 <= 0.9
    assert drawn(top_k=2, top_p=0.99) == {1, 3}
    assert drawn(top_k=4, top_p=0.75) == {1, 3}
    # the filter itself: masked logits are -inf, kept ones untouched
    filtered = filter_logits(probs.log()[None], top_k=2)[0]
    assert torch.isinf(filtered[[0, 2, 4, 5]]).all() and torch.equal(filtered[[1, 3]], probs.log()[[1, 3]])
    assert set(sample_next_token(logits[:3], SamplingOptions(temperature=0)).tolist()) == {1}


def test_bad_sampling_arguments(model):
    for kwargs in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            generate(model, [[1]], max_new_tokens=2, **kwargs)


def test_sampling_options_take_one_stop_string_or_a_list():
    assert SamplingOptions(stop="\n\n").stop == ["\n\n"]  # one string, not its characters
    assert SamplingOptions(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingOptions(stop=[]).stop is None and SamplingOptions().stop is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingOptions(max_new_tokens=-1)


def test_stops_at_eos_and_respects_max_new_tokens(model):
    prompt = [9, 10, 11]
    free = generate(model, [prompt], max_new_tokens=10, temperature=0)[0]
    assert len(free) == len(prompt) + 10  # no eos: exactly max_new_tokens
    eos = free[len(prompt) + 3]  # the 4th generated token
    first = free.index(eos, len(prompt))
    assert generate(model, [prompt], max_new_tokens=10, temperature=0, eos_id=eos)[0] == free[:first + 1]
    assert list(stream_generate(model, prompt, max_new_tokens=10, temperature=0, eos_id=eos)) == free[len(prompt):first + 1]
    # tensor input: the batch runs until every row stopped; finished rows are filled with eos
    other = [1, 2]
    batch = generate(model, torch.tensor([prompt, [3, 5, 7]]), max_new_tokens=10, temperature=0, eos_id=eos)
    alone = generate(model, [[3, 5, 7]], max_new_tokens=10, temperature=0, eos_id=eos)[0]
    assert batch.shape[1] <= 13
    row0 = batch[0].tolist()
    assert row0[:first + 1] == free[:first + 1] and set(row0[first + 1:]) <= {eos}
    assert batch[1].tolist()[:len(alone)] == alone
    assert generate(model, [other], max_new_tokens=0) == [other]


@pytest.mark.parametrize("overrides", [{}, LLAMA, dict(position="sinusoidal", num_key_value_heads=1)],
                         ids=["gpt2", "llama", "sinusoidal_mqa"])
def test_batch_of_different_lengths_equals_each_alone(overrides):
    model = make_model(**overrides)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15, 16]]
    batch = generate(model, prompts, max_new_tokens=8, temperature=0)
    alone = [generate(model, [p], max_new_tokens=8, temperature=0)[0] for p in prompts]
    assert batch == alone  # with the default repetition penalty too
    plain = generate(model, prompts, max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    assert plain == [greedy_by_hand(model, p, 8) for p in prompts]
    assert generate(model, prompts, max_new_tokens=8, temperature=0, use_cache=False) == alone


def test_stream_generate_matches_generate(model):
    prompt = [3, 1, 4, 1, 5]
    streamed = list(stream_generate(model, prompt, max_new_tokens=15, temperature=0.8, top_k=20, seed=3))
    assert prompt + streamed == generate(model, [prompt], max_new_tokens=15, temperature=0.8, top_k=20, seed=3)[0]
    assert list(stream_generate(model, torch.tensor([prompt]), max_new_tokens=4, temperature=0)) == \
        generate(model, [prompt], max_new_tokens=4, temperature=0)[0][5:]


def test_modes_are_restored(model):
    model.train()
    generate(model, [[1, 2]], max_new_tokens=3)
    assert model.training
    stream = stream_generate(model, [1, 2], max_new_tokens=5, temperature=0)
    next(stream)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()  # not leaked between steps
    list(stream)
    assert model.training
    model.eval()


def test_too_long_prompts(model):
    context = model.config.max_position_embeddings  # 48
    long_prompt = list(range(1, 61))
    with pytest.raises(ValueError, match=r"60 tokens.*max_position_embeddings=48.*truncate=True"):
        generate(model, [long_prompt], max_new_tokens=5)
    with pytest.raises(ValueError, match=r"max_new_tokens=10.*max_position_embeddings=48.*truncate"):
        generate(model, [long_prompt[:40]], max_new_tokens=10)  # fits alone, not with the new tokens
    out = generate(model, [long_prompt], max_new_tokens=5, temperature=0, truncate=True)[0]
    kept = long_prompt[-(context - 5):]
    assert out[:len(kept)] == kept and len(out) == context
    assert out == greedy_by_hand(model, kept, 5)
    with pytest.raises(ValueError, match="no room for the prompt"):
        generate(model, [[1]], max_new_tokens=context, truncate=True)
    with pytest.raises(ValueError, match="Empty prompt"):
        generate(model, [[]], max_new_tokens=3)


# ----------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("variant", ["llama", "context_cache"])
def test_decoder_rows_joining_and_leaving_equal_each_alone(variant, use_cache, monkeypatch):
    """The Decoder API by hand: rows join while others run (a wider prompt shifts the running rows right),
    leave mid-way (the last row takes the slot), and the write column reaching the end shifts every row
    left; each row's greedy tokens still equal generating it alone."""
    if variant == "context_cache":
        model = make_model(context_cache=True)
        model.context_cache.weight.fill_(0.3), model.context_cache.temperature.fill_(1.1)
    else:
        model = make_model(**LLAMA)
    context_cache = variant == "context_cache"
    shifts = []
    original_shift = Decoder.shift
    monkeypatch.setattr(Decoder, "shift", lambda self, offset: (shifts.append((self.rows, offset)),
                                                                original_shift(self, offset)))
    decoder = Decoder(model, capacity=3, max_length=20, context_cache=context_cache, use_cache=use_cache)
    rows, done = [], []  # [prompt, generated ids] per row, in the decoder's row order

    def admit(*prompts):
        for prompt, token in zip(prompts, decoder.admit(prompts).argmax(-1).tolist()):
            rows.append((list(prompt), [token]))

    def step(n):
        for _ in range(n):
            logits = decoder.step(torch.tensor([generated[-1] for _, generated in rows]))
            for (_, generated), token in zip(rows, logits.argmax(-1).tolist()):
                generated.append(token)

    def retire(i):
        decoder.retire(i)
        done.append(rows[i])
        rows[i] = rows[-1]
        rows.pop()

    with torch.inference_mode():
        admit([5, 17])
        step(3)
        admit([1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11])  # wider than the 5 columns written: row 0 shifts right
        step(4)
        retire(1)  # the 8-token prompt leaves; the last row takes its slot
        step(9)  # the write column reaches 20: every row shifts left to the oldest row's first column
        retire(0)
        admit([12, 13, 14, 15])
        step(3)
        with pytest.raises(ValueError, match="do not fit next to the 2 active rows"):
            decoder.admit([[1], [2]])
    done += rows
    assert (1, 3) in shifts and any(n == 2 and offset < 0 for n, offset in shifts), shifts
    for prompt, generated in done:
        alone = generate(model, [prompt], max_new_tokens=len(generated), temperature=0, context_cache=context_cache,
                         repetition_penalty=1.0)  # the raw argmax the decoder was driven with
        assert prompt + generated == alone[0]


# --------------------------------------------------------------------------------- text level
class ScriptedModel(nn.Module):
    """A stand-in for GPT that, after a prompt of `prompt_length` tokens, greedily "predicts" the ids
    of `script` one by one, so text-level behaviour can be tested on chosen token sequences."""

    def __init__(self, script: list[int], prompt_length: int, vocab_size: int, context: int = 256):
        super().__init__()
        self.script, self.prompt_length, self.vocab_size = script, prompt_length, vocab_size
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.dummy = nn.Parameter(torch.zeros(1))

    def new_kv_cache(self, batch_size, max_length=None):
        return SimpleNamespace(length=0)

    def forward(self, input_ids, kv_cache=None, position_ids=None, attention_mask=None):
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(T):
            k = past + t + 1 - self.prompt_length  # index in the script of the token after position past+t
            if 0 <= k < len(self.script):
                logits[:, t, self.script[k]] = 10.0
        if kv_cache is not None:
            kv_cache.length += T
        return logits


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with almost no merges: emoji and CJK characters are split over several tokens."""
    texts = ["hello world, the stop here. " * 20, "héllo wörld 😀 世界 " * 2]
    return Tokenizer.train(texts, vocab_size=270, min_frequency=2, special_tokens=[EOT])


def scripted(tokenizer: Tokenizer, prompt: str, completion: str, extra: list[int] = ()) -> ScriptedModel:
    return ScriptedModel(tokenizer.encode(completion) + list(extra), len(tokenizer.encode(prompt)),
                         tokenizer.vocab_size)


def test_streaming_never_splits_a_character(byte_tokenizer):
    tok = byte_tokenizer
    completion = "héllo 😀 世界, wörld 🎉!"
    ids = tok.encode(completion)
    # the test is only meaningful if some tokens are partial UTF-8 characters
    partial = [i for i in ids if _not_utf8(tok.decode_bytes([i]))]
    assert len(partial) >= 4
    model = scripted(tok, "hi", completion, [tok.eot_id])
    pieces = list(stream_text(model, tok, "hi", max_new_tokens=100, temperature=0))
    assert "".join(pieces) == completion
    assert len(pieces) > 5 and all(pieces)
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # raises on a lone surrogate
    assert generate_text(model, tok, ["hi"], max_new_tokens=100, temperature=0) == [completion]


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_max_new_tokens_cutting_a_character_drops_the_partial_bytes(byte_tokenizer):
    tok = byte_tokenizer
    completion = "ab😀"
    n = len(tok.encode("ab")) + 2  # stop in the middle of the emoji's bytes
    model = scripted(tok, "x", completion)
    assert generate_text(model, tok, ["x"], max_new_tokens=n, temperature=0) == ["ab"]
    assert "".join(stream_text(model, tok, "x", max_new_tokens=n, temperature=0)) == "ab"


def test_stops_at_end_of_text(byte_tokenizer):
    tok = byte_tokenizer
    model = scripted(tok, "hi", "hello", [tok.eot_id] + tok.encode(" more text"))
    assert generate_text(model, tok, ["hi"], max_new_tokens=50, temperature=0) == ["hello"]
    assert "".join(stream_text(model, tok, "hi", max_new_tokens=50, temperature=0)) == "hello"


@pytest.mark.parametrize("stop", [["STOP"], ["xyz", "STOP"], ["STOP", "P h"]])
def test_stop_strings_cut_the_text_across_pieces(byte_tokenizer, stop):
    tok = byte_tokenizer
    completion = "a ST b STO c STOP here 😀 STOP again"
    model = scripted(tok, "hi", completion)
    expected = "a ST b STO c "
    assert generate_text(model, tok, ["hi"], max_new_tokens=100, temperature=0, stop=stop) == [expected]
    pieces = list(stream_text(model, tok, "hi", max_new_tokens=100, temperature=0, stop=stop))
    assert "".join(pieces) == expected
    assert not any("STOP" in p for p in pieces)
    # held-back text is released once it can no longer become a stop string
    assert len(pieces) > 3


def test_stop_string_made_of_multibyte_characters(byte_tokenizer):
    tok = byte_tokenizer
    model = scripted(tok, "hi", "one 世界 two")
    assert generate_text(model, tok, ["hi"], max_new_tokens=100, temperature=0, stop=["世界"]) == ["one "]
    pieces = list(stream_text(model, tok, "hi", max_new_tokens=100, temperature=0, stop=["界"]))
    assert "".join(pieces) == "one 世" and all("\ufffd" not in p for p in pieces)


def test_generate_text_with_a_real_model(byte_tokenizer):
    tok = byte_tokenizer
    model = make_model(vocab_size=tok.vocab_size, max_position_embeddings=64)
    prompts = ["hello", "the stop here. hello world"]
    batch = generate_text(model, tok, prompts, max_new_tokens=12, temperature=0.9, seed=0)
    assert len(batch) == 2 and all(isinstance(t, str) for t in batch)
    greedy = generate_text(model, tok, prompts, max_new_tokens=12, temperature=0)
    assert greedy == [generate_text(model, tok, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    for p in prompts:
        joined = "".join(stream_text(model, tok, p, max_new_tokens=12, temperature=0.9, seed=1))
        assert joined == generate_text(model, tok, [p], max_new_tokens=12, temperature=0.9, seed=1)[0]
    with pytest.raises(ValueError, match="truncate"):
        generate_text(model, tok, ["hello " * 40], max_new_tokens=10)
    assert isinstance(generate_text(model, tok, ["hello " * 40], max_new_tokens=10, truncate=True)[0], str)


def test_repetition_penalty_makes_recent_tokens_less_likely():
    """CTRL's penalty over the last `repetition_window` tokens: positive logits divided, negative multiplied,
    each token once; tokens outside the window and padding (-1) untouched; greedy escapes a loop with it."""
    from lm.model.sampling import penalize_repeats, recent_tokens

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    recent = recent_tokens([[0, 0, 1]], window=4)
    assert recent.tolist() == [[-1, 0, 0, 1]]
    assert penalize_repeats(logits, recent, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    two_rows = penalize_repeats(torch.cat([logits, logits]), torch.tensor([[-1, -1, 3, 3], [-1, -1, -1, -1]]), 2.0)
    assert two_rows.tolist() == [[2.0, -1.0, 0.5, 1.5], [2.0, -1.0, 0.5, 3.0]]  # a row without tokens: untouched
    assert recent_tokens([[5, 6, 7]], window=2).tolist() == [[6, 7]]
    with pytest.raises(LMError, match="repetition_penalty must be >= 1"):
        SamplingOptions(repetition_penalty=0.9)
    model = make_model()
    prompt = [1, 2, 3, 4, 5, 6, 7]
    looping = generate(model, [prompt], max_new_tokens=8, temperature=0, repetition_penalty=1.0)[0][7:]
    assert len(set(looping)) < len(looping), "this tiny random model repeats itself greedily"
    penalized = generate(model, [prompt], max_new_tokens=8, temperature=0, repetition_penalty=2.0)[0][7:]
    assert len(set(penalized)) > len(set(looping))
