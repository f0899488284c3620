"""Property tests (issue 29) where inputs are free-form: Hypothesis draws the values, the test states what must hold
for every one of them.

- `GPTConfig`: every combination of field values either builds a model whose forward gives finite logits of the
  right shape, or is refused with one `LMError` line; never another exception, never NaN logits.
- `TextDataModule` options (sizes, fractions, loader choices): either a module that prepares, sets up and yields
  windows of `block_size + 1` tokens, or one `LMError` line.
- The tokenizer over arbitrary Unicode text: `decode(encode(s)) == s`, `decode_bytes` is the UTF-8 of `s`, and the
  per-token byte lengths (what bits-per-byte sums) add up to its UTF-8 length.
- Bits-per-byte: `lm eval`'s byte count is the scored text's UTF-8 length, every token after the first is scored
  exactly once whatever the stride, and the scored tokens' bytes are every byte of the text.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install 'lm[test]')")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lm.data.loading.datamodule import TextDataModule  # noqa: E402
from lm.data.tokenizer import Tokenizer  # noqa: E402
from lm.errors import LMError  # noqa: E402
from lm.evaluation.perplexity import evaluate_text_file, text_stream, window_spans  # noqa: E402
from lm.model import GPTConfig, build_gpt  # noqa: E402
from tests.conftest import make_corpus  # noqa: E402

PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def refused_in_one_line(error: LMError) -> None:
    message = str(error)
    assert message.strip() and message.strip().count("\n") == 0, message
    event("refused")  # (pytest --hypothesis-show-statistics: how many examples were refused, how many built)


# ------------------------------------------------------------------------------------------ GPTConfig
ODD_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-12, 1e30])


@st.composite
def configs(draw) -> dict:
    """A valid tiny config, then up to three of its fields set to anything their types allow (zero, negative,
    NaN, infinite, a choice that does not exist), so both the builds and the refusals are explored."""
    heads = draw(st.sampled_from([1, 2, 4]))
    values = {
        "vocab_size": draw(st.integers(min_value=1, max_value=300)), "hidden_size": heads * draw(st.sampled_from([2, 4, 6])),
        "num_hidden_layers": draw(st.integers(min_value=1, max_value=2)), "num_attention_heads": heads,
        "num_key_value_heads": draw(st.none() | st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "intermediate_size": draw(st.none() | st.integers(min_value=1, max_value=40)),
        "max_position_embeddings": draw(st.integers(min_value=1, max_value=12)),
        "dropout": draw(st.floats(min_value=0, max_value=0.9)),
        "attention_dropout": draw(st.none() | st.floats(min_value=0, max_value=0.9)),
        "embedding_dropout": draw(st.floats(min_value=0, max_value=0.9)),
        "bias": draw(st.booleans()), "tie_embeddings": draw(st.booleans()), "qk_norm": draw(st.booleans()),
        "zero_init_residual": draw(st.booleans()), "residual_scalars": draw(st.booleans()),
        "context_cache": draw(st.booleans()), "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
        "norm_eps": draw(st.floats(min_value=1e-8, max_value=1e-2)),
        "position": draw(st.sampled_from(["learned", "sinusoidal", "rope"])),
        "rope_base": draw(st.floats(min_value=2.0, max_value=1e6)),
        "activation": draw(st.sampled_from(["gelu", "swiglu", "relu2"])),
        "attention": draw(st.sampled_from(["sdpa", "math"])),
        "init_std": draw(st.floats(min_value=1e-4, max_value=0.1)),
        "logit_softcap": draw(st.none() | st.floats(min_value=1.0, max_value=50.0)),
        "value_embeddings": draw(st.integers(min_value=0, max_value=2)),
        "bigram_embedding": draw(st.sampled_from([0, 2, 7, 64])), "smear": draw(st.booleans()),
    }
    odd = {name: st.integers(min_value=-2, max_value=3) for name in
           ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "value_embeddings", "bigram_embedding")}
    odd.update({name: ODD_FLOATS for name in ("dropout", "attention_dropout", "embedding_dropout", "norm_eps",
                                              "rope_base", "init_std", "logit_softcap")})
    odd.update(norm=st.just("batchnorm"), position=st.just("alibi"), activation=st.just("tanh"),
               attention=st.just("flash"))
    for name in draw(st.lists(st.sampled_from(sorted(odd)), max_size=3, unique=True)):
        values[name] = draw(odd[name])
    return values


@given(values=configs(), seq=st.integers(min_value=1, max_value=12), batch=st.integers(min_value=1, max_value=2))
@settings(PROPERTY, max_examples=100)
def test_every_gpt_config_builds_and_runs_or_is_refused(values, seq, batch):
    try:
        config = GPTConfig(**values)
        model = build_gpt(config)
    except LMError as error:
        refused_in_one_line(error)
        return
    model.train(False)
    seq = min(seq, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (batch, seq, config.vocab_size)
    assert torch.isfinite(logits).all(), f"non-finite logits from {values}"
    event("built and ran")


# ------------------------------------------------------------------------------- TextDataModule options
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("property_corpus")
    files = {}
    for split, (docs, seed) in {"train": (6, 0), "valid": (2, 1), "test": (2, 2)}.items():
        files[split] = folder / f"{split}.txt"
        files[split].write_text(make_corpus(docs, seed), encoding="utf-8")
    return files


DATA_OPTIONS = st.fixed_dictionaries({
    "block_size": st.integers(min_value=-1, max_value=40) | st.sampled_from([10**6]),
    "batch_size": st.integers(min_value=-1, max_value=5),
    "vocab_size": st.integers(min_value=250, max_value=400),
}, optional={
    "eval_batch_size": st.none() | st.integers(min_value=-1, max_value=4),
    "samples_per_epoch": st.none() | st.integers(min_value=-1, max_value=20),
    "val_fraction": st.floats(min_value=-0.5, max_value=1.5) | st.sampled_from([0.0, 0.1, float("nan")]),
    "min_frequency": st.integers(min_value=-1, max_value=3),
    "shard_tokens": st.integers(min_value=-1, max_value=5000),
    "num_workers": st.integers(min_value=-1, max_value=0),
    "predict_batch_size": st.integers(min_value=-1, max_value=2),
    "tokenizer_kind": st.sampled_from(["bpe", "char", "word", "unigram"]),
    "bpe_dropout": st.floats(min_value=-0.5, max_value=1.5) | st.sampled_from([0.0, 0.1, float("nan")]),
    "bpe_dropout_variants": st.integers(min_value=-1, max_value=2),
    "with_val_files": st.booleans(), "with_test_files": st.booleans(),
})


@given(options=DATA_OPTIONS)
@settings(PROPERTY, max_examples=25)  # each example tokenizes a corpus: ~1 s
def test_every_data_option_combination_prepares_or_is_refused(options, corpus, tmp_path_factory):
    options = dict(options)
    files = {"train_files": [str(corpus["train"])],
             "val_files": [str(corpus["valid"])] if options.pop("with_val_files", True) else None,
             "test_files": [str(corpus["test"])] if options.pop("with_test_files", False) else None}
    cache = tmp_path_factory.mktemp("property_cache")
    try:
        module = TextDataModule(**files, **options, cache_dir=str(cache))
        module.prepare_data()
        module.setup("fit")
        inputs, targets = next(iter(module.train_dataloader()))
    except LMError as error:
        refused_in_one_line(error)
        return
    assert inputs.shape == targets.shape and inputs.shape[-1] == options["block_size"]
    assert 1 <= inputs.shape[0] <= options["batch_size"] and int(inputs.max()) < options["vocab_size"]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # the targets are the inputs shifted by one
    if module.val_dataset is not None:
        assert len(module.val_dataset) >= 1
    event("prepared and loaded")


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    text = make_corpus(10, 0) + "Ünïcödé — 日本語のテキスト, emoji 🙂🙃, Ελληνικά, עברית.\n"
    return {kind: Tokenizer.train([text], vocab_size=320, kind=kind) for kind in ("bpe", "char", "word", "unigram")}


UNICODE = st.text(st.characters(codec="utf-8"), max_size=80)  # any code point UTF-8 can carry (not lone surrogates)


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "unigram"])
@given(text=UNICODE)
@settings(PROPERTY, max_examples=100)
def test_tokenizer_round_trips_any_unicode(tokenizers, kind, text):
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    lengths = tokenizer.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------- bits per byte
@given(num_tokens=st.integers(min_value=2, max_value=300), context=st.integers(min_value=1, max_value=64),
       data=st.data())
@settings(PROPERTY, max_examples=100)
def test_windows_score_every_target_exactly_once(num_tokens, context, data):
    stride = data.draw(st.none() | st.integers(min_value=1, max_value=context))
    scored = []
    for span in window_spans(num_tokens, context, stride):
        assert 0 < span.end - span.begin <= context and 0 <= span.score_from < span.end - span.begin
        scored += range(span.begin + span.score_from, span.end)  # target positions (stream index - 1)
    assert scored == list(range(num_tokens - 1))


@pytest.fixture(scope="module")
def scorer(tokenizers):
    tokenizer = tokenizers["bpe"]
    torch.manual_seed(0)
    model = build_gpt(GPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=16)).eval()
    return model, tokenizer


@given(text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=60), stride=st.none() | st.integers(1, 16))
@settings(PROPERTY, max_examples=60)
def test_bits_per_byte_counts_the_texts_utf8_bytes(scorer, text, stride, tmp_path_factory):
    model, tokenizer = scorer
    path = tmp_path_factory.mktemp("bpb") / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    stream, num_bytes = text_stream(path, tokenizer)
    result = evaluate_text_file(model, tokenizer, path, stride=stride)
    utf8 = len(text.encode("utf-8"))
    assert num_bytes == result["bytes"] == utf8
    assert result["tokens"] == len(stream) - 1  # after <|endoftext|>, every token of the text is scored once
    lengths = tokenizer.token_byte_lengths()
    assert sum(lengths[int(i)] for i in stream[1:]) == utf8  # and those tokens stand for every byte
    assert math.isclose(result["bpb"], result["nll"] / (math.log(2) * utf8), rel_tol=1e-12)
