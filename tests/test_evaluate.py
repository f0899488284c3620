"""`lm eval` perplexity / bits-per-byte (lm/evaluation/perplexity.py): window arithmetic, stride = context equals
non-overlapping windows, independence of batch size, bits-per-byte over the raw file's bytes, and
the command's JSON and table."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lm.commands.eval import evaluate
from lm.evaluation.perplexity import evaluate_text_file, score_windows, text_stream, window_spans
from lm.evaluation.token_losses import target_log_probs_by_temperature
from lm.model.inference import onednn_fp32_supported
from tests.conftest import make_corpus
from tests.tiny_checkpoint import tiny_gpt, tiny_tokenizer, write_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    tokenizer = tiny_tokenizer()
    model = tiny_gpt(tokenizer.vocab_size)
    text = tmp / "test.txt"
    text.write_text(make_corpus(2, 5) + "Ünïcödé ✓ — 日本\r\n", encoding="utf-8")
    return tmp, model, tokenizer, text


@pytest.mark.parametrize("num_tokens,context,stride", [(100, 32, 32), (100, 32, 7), (33, 32, 16), (5, 32, 4)])
def test_every_target_is_scored_exactly_once_with_bounded_context(num_tokens, context, stride):
    spans = window_spans(num_tokens, context, stride)
    scored = [s.begin + i for s in spans for i in range(s.score_from, s.end - s.begin)]
    assert scored == list(range(num_tokens - 1))
    assert all(0 < s.end - s.begin <= context for s in spans)
    if stride < context:  # after the first window every scored token has at least context - stride tokens before it
        assert all(s.end - s.begin == context for s in spans[1:-1])


def test_stride_equal_to_context_is_non_overlapping(setup):
    _, model, tokenizer, text = setup
    plain = evaluate_text_file(model, tokenizer, text)
    strided = evaluate_text_file(model, tokenizer, text, stride=model.config.max_position_embeddings)
    assert strided == plain
    # Non-overlapping by hand: chunks of 32 inputs, 32 next-token targets.
    stream, _ = text_stream(text, tokenizer)
    nll = 0.0
    with torch.no_grad():
        for b in range(0, len(stream) - 1, 32):
            x, y = stream[b:b + 32], stream[b + 1:b + 33]
            x = x[:len(y)]
            nll += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
    assert plain["nll"] == pytest.approx(nll, rel=1e-5)
    assert plain["tokens"] == len(tokenizer.encode(text.read_bytes().decode("utf-8")))  # \r kept


def test_strided_uses_more_context_and_batch_size_does_not_matter(setup):
    _, model, tokenizer, text = setup
    stream, _ = text_stream(text, tokenizer)
    spans = window_spans(len(stream), 32, 8)
    nll1, n1 = score_windows(model, stream, spans, batch_size=1)
    nll7, n7 = score_windows(model, stream, spans, batch_size=7)
    assert n1 == n7 == len(stream) - 1
    assert nll1 == pytest.approx(nll7, rel=1e-6)
    plain = evaluate_text_file(model, tokenizer, text)
    assert plain["tokens"] == n1 and plain["nll"] != pytest.approx(nll1, rel=1e-9)


def test_bf16_scoring_makes_the_logits_a_chunk_at_a_time_with_the_same_result(setup, monkeypatch):
    """From bf16 hidden states `lm eval` makes the head's logits HEAD_ROWS positions at a time (never the whole
    batch x time x vocab logits); the log-probabilities are those of the whole logits, row for row."""
    import lm.evaluation.perplexity as perplexity

    _, model, tokenizer, text = setup
    bf16 = tiny_gpt(tokenizer.vocab_size).to(torch.bfloat16)
    stream, _ = text_stream(text, tokenizer)
    inputs, targets = stream[:96].view(3, 32), stream[1:97].view(3, 32)
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 40)  # 96 positions: chunks of 40, 40 and 16
    shapes = []
    head = lambda hidden: shapes.append(tuple(hidden.shape)) or bf16.head(hidden)  # noqa: E731
    with torch.inference_mode():
        hidden = bf16(inputs, return_hidden=True)
        chunked = perplexity._target_log_probs(head, hidden, targets, [1.0, 1.3])
        whole = target_log_probs_by_temperature(bf16.head(hidden), targets, [1.0, 1.3])
        assert [s[1] for s in shapes] == [40, 40, 16]
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
        shapes.clear()  # float32 hidden states: one product, as before
        float32_head = lambda hidden: shapes.append(tuple(hidden.shape)) or model.head(hidden)  # noqa: E731
        perplexity._target_log_probs(float32_head, model(inputs, return_hidden=True), targets, [1.0])
        assert shapes == [(3, 32, 32)]
    # The whole path agrees: bf16 scoring of the file through score_windows with chunks and without.
    spans = window_spans(len(stream), 32)
    chunked_nll, count = score_windows(bf16, stream, spans, batch_size=4)
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 10 ** 9)
    assert score_windows(bf16, stream, spans, batch_size=4) == pytest.approx((chunked_nll, count), rel=1e-6)


@pytest.mark.skipif(not onednn_fp32_supported(), reason="torch has no oneDNN here, or this is not an x86 CPU")
def test_a_prepared_fp32_model_scores_in_chunks_with_the_same_result(setup, monkeypatch):
    """`lm eval` prepares the model: its fp32 LM head multiplies by a packed oneDNN weight, so the logits are made
    HEAD_ROWS positions at a time as from bf16 ones; the summed NLL is the unprepared model's."""
    import lm.evaluation.perplexity as perplexity

    _, model, tokenizer, text = setup
    stream, _ = text_stream(text, tokenizer)
    spans = window_spans(len(stream), 32)
    plain = score_windows(model, stream, spans, batch_size=4)
    prepared = tiny_gpt(tokenizer.vocab_size)
    prepared.load_state_dict(model.state_dict())
    prepared.prepare_for_inference()
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 40)
    heads = []

    def scored(logits, *args):
        heads.append(logits.shape[1])
        return target_log_probs_by_temperature(logits, *args)

    monkeypatch.setattr(perplexity, "target_log_probs_by_temperature", scored)
    assert score_windows(prepared, stream, spans, batch_size=4) == pytest.approx(plain, rel=1e-6)
    assert heads and max(heads) == 40  # 4 windows of 32 positions: chunks of 40 (and the rest)


def test_bpb_divides_by_every_byte_of_the_raw_file(setup):
    _, model, tokenizer, text = setup
    scores = evaluate_text_file(model, tokenizer, text)
    raw = text.read_bytes()
    assert b"\r\n" in raw and scores["bytes"] == len(raw) > len(text.read_text(encoding="utf-8"))
    assert scores["bpb"] == pytest.approx(scores["nll"] / math.log(2) / len(raw))
    assert scores["ppl"] == pytest.approx(math.exp(scores["nll"] / scores["tokens"]))


def test_lm_eval_writes_json_and_prints_a_table(setup, capsys):
    tmp, model, tokenizer, text = setup
    ckpt = write_checkpoint(tmp / "tiny.ckpt", model, tokenizer)
    out = tmp / "eval.json"
    evaluate(str(ckpt), text_files=[str(text), str(text)], stride=16, output=str(out))
    rows = json.loads(out.read_text())["text"]
    assert [(r["file"] == str(text), r["method"]) for r in rows] == [
        (True, "non-overlapping"), (True, "non-overlapping"), (False, "non-overlapping"),
        (True, "stride 16"), (True, "stride 16"), (False, "stride 16")]
    assert rows[2]["bpb"] == pytest.approx(rows[0]["bpb"]) and rows[2]["tokens"] == 2 * rows[0]["tokens"]
    printed = capsys.readouterr().out
    assert "bpb" in printed and "stride 16" in printed
    with pytest.raises(ValueError, match="stride"):
        evaluate(str(ckpt), text_files=[str(text)], stride=33)
    latin = tmp / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        evaluate(str(ckpt), text_files=[str(latin)])
