"""The continuous-batching engine of `lm serve`, in process: every request gets what it would get
alone (greedy: `generate_text`; seeded sampling: `stream_text`), also when requests join and leave
mid-batch and the shared cache has to shift; cancelling frees the slot; a failing step fails only
its requests."""

from __future__ import annotations

import threading

import pytest
import torch

from lm.io.checkpoints import load_model
from lm.model import Decoder, SamplingOptions, generate_text, stream_text
from lm.serve.engine import BatchEngine, Failed, Finished, GenerationRequest, Piece
from tests.serve_support import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for the first on a shared machine
    yield load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny.ckpt"))
    torch.set_num_threads(threads)


class Collector:
    """Gathers each request's pieces and final event."""

    def __init__(self, expected: int):
        self.text: dict[int, list[str]] = {}
        self.end: dict[int, object] = {}
        self.expected, self.done = expected, threading.Event()

    def callback(self, key: int):
        self.text[key] = []

        def on_event(event):
            if isinstance(event, Piece):
                self.text[key].append(event.text)
            else:
                self.end[key] = event
                if len(self.end) == self.expected:
                    self.done.set()
        return on_event

    def result(self, key: int) -> str:
        return "".join(self.text[key])


def run_requests(engine: BatchEngine, tokenizer, jobs: list[tuple[str, SamplingOptions]]) -> Collector:
    collector = Collector(len(jobs))
    for i, (prompt, options) in enumerate(jobs):
        engine.submit(GenerationRequest(tokenizer.encode(prompt), options, collector.callback(i)))
    assert collector.done.wait(60), "the engine did not finish the requests"
    return collector


PROMPTS = ["The river", "A small town was built in", " = = Section 1 = = \n The old castle was", "Her",
           "The railway became famous in the early spring", " = Article number 3 = ", "This species is found"]


def with_context_cache(model):
    """The same weights with a calibrated context cache: the engine must move its hidden states and ids too."""
    from dataclasses import replace

    from lm.model import build_gpt

    cached = build_gpt(replace(model.config, context_cache=True))
    cached.load_state_dict(model.state_dict(), strict=False)
    cached.context_cache.weight.fill_(0.3), cached.context_cache.temperature.fill_(1.1)
    return cached.eval()


@pytest.mark.parametrize("context_cache", [False, True])
def test_greedy_batched_equals_alone_with_joins_leaves_and_shifts(model_and_tokenizer, monkeypatch, context_cache):
    model, tokenizer = model_and_tokenizer
    if context_cache:
        model = with_context_cache(model)
    engine = BatchEngine(model, tokenizer, max_batch_size=3)
    shifts = []
    original_shift = Decoder.shift

    def shift(decoder, offset):  # record the engine's moves of active rows
        if decoder is engine.decoder and decoder.rows:
            shifts.append(offset)
        original_shift(decoder, offset)

    monkeypatch.setattr(Decoder, "shift", shift)
    lengths = [5, 30, 12, 40, 20, 33, 25]
    jobs = [(p, SamplingOptions(max_new_tokens=n, temperature=0)) for p, n in zip(PROMPTS * 2, lengths * 2)]
    jobs += [(PROMPTS[1], SamplingOptions(max_new_tokens=20, temperature=0, stop=[" the"]))]
    engine.start()
    try:
        collector = run_requests(engine, tokenizer, jobs)
    finally:
        engine.stop()
    for i, (prompt, options) in enumerate(jobs):
        alone = generate_text(model, tokenizer, [prompt], max_new_tokens=options.max_new_tokens, temperature=0,
                              stop=options.stop)[0]
        assert collector.result(i) == alone, f"request {i} ({prompt!r}) differs from generating it alone"
        assert isinstance(collector.end[i], Finished)
    # Requests really shared steps (fewer forwards than tokens) and the running rows shifted left at the
    # context's end (right, to make room for a wider prompt: the next test).
    assert engine.steps < sum(o.max_new_tokens for _, o in jobs) / 2
    assert any(s < 0 for s in shifts), shifts
    assert engine.active_count == 0


def test_seeded_sampling_equals_stream_text_per_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    jobs = [(p, SamplingOptions(max_new_tokens=15, temperature=0.9, top_k=40, top_p=0.95 if i % 2 else None, seed=i))
            for i, p in enumerate(PROMPTS)]
    engine = BatchEngine(model, tokenizer, max_batch_size=4).start()
    try:
        collector = run_requests(engine, tokenizer, jobs)
    finally:
        engine.stop()
    for i, (prompt, options) in enumerate(jobs):
        alone = "".join(stream_text(model, tokenizer, prompt, max_new_tokens=15, temperature=0.9, top_k=40,
                                    top_p=options.top_p, seed=i))
        assert collector.result(i) == alone


def test_generate_text_and_the_engine_drive_the_same_decoder(model_and_tokenizer, monkeypatch):
    """One decode engine: the server's requests (joining while others run, leaving mid-way, moving the
    shared columns right and left) and `generate_text` both run `lm.model.Decoder`, and every request's
    text equals `generate_text`'s for the same prompt and options (greedy or seeded)."""
    model, tokenizer = model_and_tokenizer
    calls = []  # (decoder, method, active rows before the call, arguments)
    for name in ("admit", "step", "retire", "shift"):
        def record(self, *args, _original=getattr(Decoder, name), _name=name):
            calls.append((self, _name, self.rows, args))
            return _original(self, *args)
        monkeypatch.setattr(Decoder, name, record)
    seeded = dict(temperature=0.9, top_k=40)
    jobs = [("Her", SamplingOptions(max_new_tokens=50, seed=11, **seeded)),
            ("The river", SamplingOptions(max_new_tokens=3, temperature=0)),
            (PROMPTS[2], SamplingOptions(max_new_tokens=20, seed=12, **seeded)),  # 22 tokens: wider than the columns
            (PROMPTS[1], SamplingOptions(max_new_tokens=12, temperature=0, stop=[" the"])),
            (PROMPTS[4], SamplingOptions(max_new_tokens=30, seed=14, top_p=0.9, **seeded))]
    engine = BatchEngine(model, tokenizer, max_batch_size=2)
    collector = Collector(len(jobs))
    for i, (prompt, options) in enumerate(jobs):  # all queued first: the same admissions every run
        engine.submit(GenerationRequest(tokenizer.encode(prompt), options, collector.callback(i)))
    engine.start()
    try:
        assert collector.done.wait(60), "the engine did not finish the requests"
    finally:
        engine.stop()
    served = [(name, rows, args) for decoder, name, rows, args in calls if decoder is engine.decoder]
    assert isinstance(engine.decoder, Decoder) and len(served) == len(calls)
    assert any(name == "admit" and rows > 0 for name, rows, _ in served), "no request joined a running batch"
    assert any(name == "retire" and rows > 1 for name, rows, _ in served), "no request left a running batch"
    assert any(name == "shift" and rows > 0 and args[0] > 0 for name, rows, args in served), served
    assert any(name == "shift" and rows > 0 and args[0] < 0 for name, rows, args in served), served

    calls.clear()
    for i, (prompt, options) in enumerate(jobs):
        assert collector.result(i) == generate_text(model, tokenizer, [prompt], options)[0], f"request {i} differs"
    used = {(type(decoder), name) for decoder, name, _, _ in calls}
    assert {(Decoder, "admit"), (Decoder, "step")} <= used  # generate_text ran the same class


def test_cancel_frees_the_slot_and_a_failed_step_fails_only_its_requests(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    engine = BatchEngine(model, tokenizer, max_batch_size=2).start()
    try:
        first_piece = threading.Event()
        request = GenerationRequest(tokenizer.encode("The river"), SamplingOptions(max_new_tokens=50, temperature=0),
                                    lambda e: first_piece.set() if isinstance(e, Piece) else None)
        engine.submit(request)
        assert first_piece.wait(30)
        request.cancel()
        for _ in range(200):
            if engine.active_count == 0:
                break
            threading.Event().wait(0.05)
        assert engine.active_count == 0

        calls = {"n": 0}
        original = model.forward

        def fail_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the first decode step after a prefill
                raise RuntimeError("simulated failure")
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", fail_once)
        failed = run_requests(engine, tokenizer, [("The river", SamplingOptions(max_new_tokens=5, temperature=0))])
        assert isinstance(failed.end[0], Failed) and "simulated failure" in failed.end[0].message
        ok = run_requests(engine, tokenizer, [("The river", SamplingOptions(max_new_tokens=5, temperature=0))])
        assert isinstance(ok.end[0], Finished) and engine.is_alive()
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(GenerationRequest([1] * 60, SamplingOptions(max_new_tokens=10), lambda e: None))
