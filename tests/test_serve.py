"""`lm serve` as a real server process on 127.0.0.1, driven by httpx and the official `openai` client:
completions (equal to `generate_text` when greedy), SSE streams to [DONE], chat, each validation
error, the API key, concurrent requests each with its own result, an oversized body refused
without reading it, a disconnect mid-stream freeing its slot, feedback lines, /metrics and /info."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lm.io.checkpoints import load_model
from lm.model import generate_text
from lm.runtime.hardware import auto_inference_dtype
from lm.serve.filters import Blocklist
from tests.serve_support import ServerProcess, make_tiny_checkpoint

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The river", "A small town was", " = = Section 2 = = ", "Her first album", "This species", "The old"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for the first on a shared machine
    ckpt = make_tiny_checkpoint(workdir / "tiny.ckpt", context=128)
    proc = ServerProcess(ckpt, workdir, "--max_batch_size", "4", "--max_tokens", "100", "--max_body_bytes", "100000",
                         "--feedback_path", str(workdir / "feedback.jsonl"), "--model_name", "tiny",
                         env={"LM_API_KEY": KEY})
    # The server decodes in `--dtype auto` (for its 4 batch slots: bfloat16 on a CPU with native bf16), prepared for
    # inference as `lm serve` prepares it: the reference greedy text comes from the same.
    model, tokenizer = load_model(ckpt, dtype=getattr(torch, auto_inference_dtype("cpu", decode_rows=4)[0]))
    model.prepare_for_inference()
    yield proc, workdir, model, tokenizer
    torch.set_num_threads(threads)
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0].url, headers=AUTH, timeout=60) as c:
        yield c


def greedy(server, prompt: str, n: int) -> str:
    _, _, model, tokenizer = server
    return generate_text(model, tokenizer, [prompt], max_new_tokens=n, temperature=0)[0]


def sse_events(response: httpx.Response) -> list:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_completion_and_openai_client(server, client):
    proc = server[0]
    r = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == greedy(server, "The river", 12)
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12

    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in oa.models.list().data] == ["tiny"]
    completion = oa.completions.create(model="tiny", prompt="A small town was", max_tokens=10, temperature=0)
    assert completion.choices[0].text == greedy(server, "A small town was", 10)
    chat = oa.chat.completions.create(model="tiny", max_tokens=8, temperature=0,
                                      messages=[{"role": "system", "content": "Answer."}, {"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    pieces = [c.choices[0].delta.content or "" for c in
              oa.chat.completions.create(model="tiny", max_tokens=8, temperature=0, stream=True,
                                         messages=[{"role": "system", "content": "Answer."},
                                                   {"role": "user", "content": "Hi"}])]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=3)


def test_stream_reads_to_done_with_usage(server, client):
    with client.stream("POST", "/v1/completions",
                       json={"prompt": "Her first album", "max_tokens": 20, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2 and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(server, "Her first album", 20)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 20
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 101}, 400, "max_tokens"),  # above --max_tokens 100
    ({"prompt": "The river " * 10, "max_tokens": 100}, 400, "max_tokens"),  # prompt + max_tokens > context
    ({"prompt": "The river " * 60}, 400, "prompt"),  # longer than the context
    ({"prompt": "The river " * 9_000}, 400, "prompt"),  # 90 KB: refused by its size, before it is tokenized
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),  # beyond 64 bits: refused, not a 500
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "logprobs": 1}, 400, "logprobs"),  # OpenAI fields not implemented: refused, not ignored
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ({"prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"prompt": "x", "max_token": 5}, 400, "max_token"),  # a typo: refused, as OpenAI does
    ({"prompt": "x", "max_tokens": 5, "max_completion_tokens": 6}, 400, None),
])
def test_each_validation_error_is_an_openai_error(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_openai_fields_at_their_off_value_are_accepted(server, client):
    """What some OpenAI clients send by default (null logprobs, echo false, zero penalties, an empty logit_bias,
    best_of 1, stream_options, user) asks for nothing and is accepted; `max_completion_tokens`, OpenAI's newer
    name, is `max_tokens`. Asking for a field the server does not implement is a 400 naming it."""
    body = {"prompt": "The river", "max_completion_tokens": 5, "temperature": 0, "logprobs": None, "echo": False,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": None,
            "stream_options": {"include_usage": True}, "user": "u1"}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["text"] == greedy(server, "The river", 5)
    chat = {"messages": [{"role": "user", "content": "Hi", "name": "ann"}], "max_tokens": 3, "tools": [],
            "response_format": {"type": "text"}, "tool_choice": "none", "top_logprobs": 0}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200

    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        oa.completions.create(model="tiny", prompt="The river", max_tokens=3, logprobs=2)
    assert "logprobs=2 asks for token log-probabilities" in str(error.value)


def test_prompts_that_are_not_text_or_far_too_long_are_refused_before_tokenizing(client):
    """A lone UTF-16 surrogate (valid JSON, not text) was a 500; a prompt far over the token limit is refused by
    its size (the message says bytes), before the tokenizer sees it and keeps memory for it."""
    r = client.post("/v1/completions", content='{"prompt": "a \\ud800 b"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "surrogate" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "river " * 15_000}]})
    assert r.status_code == 400 and "bytes" in r.json()["error"]["message"], r.text


def test_malformed_requests_auth_and_server_survives(server, client):
    url = server[0].url
    r = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})  # no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    assert client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2}).status_code == 200


def test_oversized_body_refused_without_reading_it(server, client):
    proc = server[0]

    def rss_kb() -> int:
        status = open(f"/proc/{proc.proc.pid}/status").read()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    before = rss_kb()
    r = client.post("/v1/completions", content=b"x" * 200_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def endless_chunks():  # no Content-Length: chunked upload of up to 50 MB
        for _ in range(800):
            yield b"y" * 65536

    try:
        r = client.post("/v1/completions", content=endless_chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    except httpx.HTTPError:
        pass  # the server answered 413 and closed while we were still sending: also a refusal
    assert rss_kb() - before < 20_000  # far less than the 50 MB offered
    assert client.get("/health").status_code == 200


def test_concurrent_requests_each_get_their_own_result(server, client):
    expected = {p: greedy(server, p, 16) for p in PROMPTS}
    steps_before = client.get("/info").json()["engine"]["decode_steps"]

    def ask(prompt: str) -> str:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
    assert results == expected
    steps = client.get("/info").json()["engine"]["decode_steps"] - steps_before
    assert steps < 15 * len(PROMPTS)  # they shared decode steps (4 slots), not one request after another


def test_disconnect_mid_stream_frees_the_slot(server, client):
    proc = server[0]
    generated_before = client.get("/info").json()["engine"]["tokens_generated"]
    with client.stream("POST", "/v1/completions",
                       json={"prompt": "The", "max_tokens": 100, "temperature": 0, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    response_id = json.loads(first[len("data: "):])["id"]
    deadline = time.time() + 20
    while time.time() < deadline and client.get("/info").json()["engine"]["active_requests"]:
        time.sleep(0.1)
    assert client.get("/info").json()["engine"]["active_requests"] == 0
    assert "lm_active_requests 0.0" in client.get("/metrics").text
    assert client.get("/info").json()["engine"]["tokens_generated"] - generated_before < 100  # stopped early
    deadline = time.time() + 10
    while time.time() < deadline and response_id not in proc.output():
        time.sleep(0.1)
    line = next(json.loads(l.split(" INFO ", 1)[1]) for l in proc.output().splitlines() if response_id in l)
    assert line["finish_reason"] == "cancelled" and line["completion_tokens"] is None


def test_feedback_appends_alpaca_lines_safely(server, client):
    workdir = server[1]
    r = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 6, "temperature": 0})
    response_id, output = r.json()["id"], r.json()["choices"][0]["text"]
    assert client.post("/v1/feedback", json={"id": response_id, "rating": "up"}).json()["training_example"] is True
    r = client.post("/v1/feedback", json={"id": response_id, "rating": "down", "correction": "flows to the sea."})
    assert r.status_code == 200 and r.json()["training_example"] is True
    assert client.post("/v1/feedback", json={"id": response_id, "rating": "down"}).json()["training_example"] is False
    assert client.post("/v1/feedback", json={"id": "cmpl-nope", "rating": "up"}).status_code == 404
    assert client.post("/v1/feedback", json={"id": response_id}).status_code == 400
    assert client.post("/v1/feedback", json={"id": response_id, "rating": "meh"}).status_code == 400

    def correct(i: int) -> int:
        return client.post("/v1/feedback", json={"id": response_id, "correction": f"answer {i} " + "z" * 3000}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(correct, range(40))) == {200}
    lines = (workdir / "feedback.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: no interleaved writes
    assert len(records) == 42
    assert records[0] == {**records[0], "instruction": "The river", "input": "", "output": output, "rating": "up"}
    assert records[1]["output"] == "flows to the sea." and records[1]["corrected"] is True
    assert sorted(int(r["output"].split()[1]) for r in records[2:]) == list(range(40))
    assert 'lm_feedback_total{rating="correction"} 41.0' in client.get("/metrics").text


def test_metrics_info_models_and_playground(server, client):
    assert client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3}).status_code == 200
    metrics = client.get("/metrics").text
    for name in ("lm_requests_total", "lm_request_latency_seconds_bucket", "lm_time_to_first_token_seconds_count",
                 "lm_completion_tokens_total", "lm_active_requests", "lm_decode_steps_total"):
        assert name in metrics
    info = client.get("/info").json()
    assert info["config"]["max_position_embeddings"] == 128 and info["parameters"] > 0
    assert info["dtype"] == auto_inference_dtype("cpu", decode_rows=4)[0]  # --dtype auto, for 4 rows
    assert info["tokenizer"]["vocab_size"] == 300 and info["checkpoint"]["global_step"] == 20
    assert info["engine"]["max_batch_size"] == 4 and info["limits"]["max_tokens"] == 100
    page = httpx.get(server[0].url + "/")
    assert page.status_code == 200 and "lm playground" in page.text
    log = server[0].output()
    assert '"path": "/v1/completions", "status": 200, "prompt_tokens"' in log  # the request log


def test_blocklist_filter_masks_words_across_pieces():
    stream = Blocklist(["secret", "darn"]).stream()
    pieces = ["This is a sec", "ret, and Sec", "retly fine; a DA", "RN", " ends da", "rn"]
    out = "".join(stream.feed(p) for p in pieces) + stream.finish()
    assert out == "This is a ***, and Secretly fine; a *** ends ***"
    with pytest.raises(ValueError, match="empty"):
        Blocklist(["", " "])


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_playground_in_headless_chromium(server, tmp_path):
    """Type a prompt in the page, watch the text stream in, send a thumbs-up; screenshot in tmp_path."""
    import os

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (`apt-get install chromium`; .ci/run installs it)")
    proc, workdir = server[0], server[1]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(proc.url + "/")
            page.fill("#api_key", KEY)
            page.fill("#prompt", "The river")
            page.fill("#max_tokens", "100")
            page.fill("#temperature", "0")
            # Record the text's length at every change of the output box: streamed text grows in steps.
            page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
                const c = document.getElementById('completion'); if (c) window.seen.push(c.textContent.length);
              }).observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true}); }""")
            # A slow network (16 kB/s, ~1 s for this stream), so the browser reads the stream in pieces
            # however fast the tiny model is; on loopback it may otherwise get it all in one or two reads.
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                          "downloadThroughput": 16_000, "uploadThroughput": -1})
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.endsWith('(done)')")
            assert page.text_content("#status") == "100 tokens, length (done)"
            text = page.text_content("#completion")
            seen = page.evaluate("window.seen")
            assert len({n for n in seen if 0 < n < len(text)}) >= 3, (seen, len(text))  # partial text shown
            assert text == greedy(server, "The river", 100)
            assert page.text_content("#model") == "tiny"
            page.click("#up")
            page.wait_for_function("document.getElementById('status').textContent.includes('feedback recorded')")
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 5000
    records = [json.loads(line) for line in (workdir / "feedback.jsonl").read_text().splitlines()]
    assert records[-1]["instruction"] == "The river" and records[-1]["output"] == text
