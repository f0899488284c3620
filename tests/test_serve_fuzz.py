"""The HTTP API fuzzed (issue 29): no request, however malformed, gets a 5xx, and every 4xx has OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`.

- `test_schema_operations`: Schemathesis reads the server's own OpenAPI schema (GET /openapi.json) and drives every
  operation in it with bodies generated to fit the schema (positive) and to break it (negative: wrong types,
  missing fields, values out of range), checking each answer against the schema (status, content type, body:
  the `ErrorResponse` model for every 4xx) and that a body the schema forbids is refused.
- `test_raw_requests`: Hypothesis sends what no schema describes: any method on any path, random headers
  (content types, content encodings, API keys), bodies of random bytes, JSON of any shape, the request fields
  with values of any type (huge numbers, NaN, lone UTF-16 surrogates escaped in JSON, control characters).
- `test_feedback_text`: feedback with arbitrary text for a real response id (what is written to the JSONL file).

The example counts are bounded so the module takes well under a minute; `LM_FUZZ_EXAMPLES=500` runs a bigger
fuzz (docs/serving.md has the figures of one). Each test counts its requests and 5xx answers and prints them
(`pytest -s`).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz tests need schemathesis (pip install 'lm[test]')")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from lm.commands.serve import build_state  # noqa: E402
from lm.serve.app import create_app  # noqa: E402
from lm.serve.protocol import ChatRequest, CompletionRequest, FeedbackRequest  # noqa: E402
from tests.serve_support import make_tiny_checkpoint  # noqa: E402

EXAMPLES = int(os.environ.get("LM_FUZZ_EXAMPLES", "25"))  # per operation and mode
API_KEY = "fuzz-key"
OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /info", "GET /health",
              "GET /metrics", "GET /", "POST /v1/feedback"]
WITH_BODY = [op for op in OPERATIONS if op.startswith("POST")]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _state(tmp_path_factory, max_body_bytes: int, **options):
    folder = tmp_path_factory.mktemp("fuzz")
    ckpt = make_tiny_checkpoint(folder / "tiny.ckpt", steps=1)
    # max_tokens 4: the generations the fuzz asks for stay short
    return build_state(str(ckpt), max_tokens=4, max_body_bytes=max_body_bytes, model_name="tiny/last",
                       feedback_path=str(folder / "feedback" / "feedback.jsonl"), **options)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # A body cap above the schema's longest field (a 20,000-character correction), so what the schema forbids
    # meets the body's validation (a 400), not the cap (a 413, which Schemathesis does not expect for bad data).
    state = _state(tmp_path_factory, max_body_bytes=400_000)
    state.engine.start()
    yield create_app(state)
    state.engine.stop()


@pytest.fixture(scope="module")
def keyed_client(tmp_path_factory):
    """A server that requires an API key, so random Authorization headers meet the key check."""
    state = _state(tmp_path_factory, max_body_bytes=2_000, api_key=API_KEY)  # a small cap: 413s in the mix
    state.engine.start()
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        yield client
    state.engine.stop()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_answer(status: int, text: str, label: str, tally: Counter, has_body: bool = True) -> None:
    tally["requests"] += 1
    tally["5xx"] += status >= 500
    tally[f"{status // 100}xx"] += status < 500
    assert status < 500, f"{label} -> {status} {text[:500]}"
    if status >= 400 and has_body:  # (a HEAD answer has none)
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, text
        assert isinstance(error["message"], str) and error["message"].count("\n") <= 1, text


@pytest.mark.parametrize("body", [
    {"prompt": "The river", "temperature": 1e-300, "max_tokens": 2},  # was a 500: 1e-300 is 0 in float32, NaN probs
    {"prompt": "The river", "temperature": 5e-324, "max_tokens": 2},
    {"prompt": "The river", "top_p": 1e-300, "max_tokens": 2},  # was a 500: every token filtered out
    {"prompt": "The river", "top_k": 10**30, "max_tokens": 2}])
def test_sampling_edges_found_by_fuzzing_are_served(app, body):
    """Values inside the API's ranges that the fuzz found failing the generation: now answered, greedily at the edge."""
    with TestClient(app) as client:
        response = client.post("/v1/completions", json=body)
        greedy = client.post("/v1/completions", json={**body, "temperature": 0, "top_p": None, "top_k": None})
    assert response.status_code == 200, response.text
    if body.get("temperature", 1) < 1e-30 or body.get("top_p", 1) < 1e-30:  # only the most likely token is left
        assert response.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_the_schema_lists_every_operation(api_schema):
    listed = {f"{result.ok().method.upper()} {result.ok().path}" for result in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)  # a new endpoint joins OPERATIONS, and so the fuzz


@pytest.mark.parametrize("operation,mode", [(op, "positive") for op in OPERATIONS] + [(op, "negative") for op in WITH_BODY])
def test_schema_operations(api_schema, operation, mode):
    method, path = operation.split()
    tally: Counter = Counter()

    @given(case=api_schema[path][method].as_strategy(schemathesis.GenerationMode(mode)))
    @FUZZ
    def fuzz(case):
        # Every check but "a body the schema accepts gets a 2xx": the schema cannot say that a prompt must fit
        # the model's context or that `model` must name the served model, so such bodies are rightly refused.
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        check_answer(response.status_code, response.text, case.as_curl_command(), tally)

    fuzz()
    print(f"{operation} {mode}: {dict(tally)}")
    assert tally["requests"] > 0 and tally["5xx"] == 0


# ------------------------------------------------------------------------------ beyond the schema
FIELDS = sorted(set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(FeedbackRequest.model_fields))
# Text as JSON can carry it: any code point, lone UTF-16 surrogates included (st.text() leaves them out).
TEXT = st.text() | st.text(st.characters(categories=["Cs", "Cc", "Zs", "Ll", "Lo", "So"]), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
SHORT_TEXT = st.text(max_size=40) | st.text(st.characters(categories=["Cs", "Cc", "Ll", "So"]), max_size=8)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": SHORT_TEXT}), min_size=1, max_size=3)
# Values a client might send for each field: mostly of the right type (so requests get past validation into the
# generation), at the edges (tiny temperatures, huge integers, empty and control-character text).
PLAUSIBLE = {
    "max_tokens": st.integers(min_value=1, max_value=6) | st.sampled_from([0, -1, 2**31, 2**64, 10**30]),
    "max_completion_tokens": st.integers(min_value=1, max_value=6) | st.just(0),
    "temperature": st.floats(min_value=0, max_value=2) | st.sampled_from([1e-300, 5e-324, 1e-45, 2.0000001]),
    "top_p": st.floats(min_value=0, max_value=1) | st.sampled_from([1e-300, 5e-324, 1e-45]),
    "top_k": st.integers(min_value=0, max_value=2**70),
    "seed": st.integers(min_value=0, max_value=2**63 - 1) | st.sampled_from([-1, 2**63, 2**64]),
    "stop": SHORT_TEXT | st.lists(SHORT_TEXT, max_size=5), "stream": st.booleans(),
    "n": st.just(1) | st.integers(0, 2), "model": st.sampled_from(["tiny/last", None]), "user": SHORT_TEXT,
    "logprobs": st.sampled_from([None, False, 0, 1, True]), "echo": st.sampled_from([None, False, True]),
    "stream_options": st.sampled_from([None, {"include_usage": True}]),
}
WELL_FORMED = {  # per endpoint: bodies of the right shape, with a few plausible fields (so many reach the generation)
    "/v1/completions": st.fixed_dictionaries({"prompt": SHORT_TEXT | st.lists(SHORT_TEXT, max_size=2)},
                                             optional=PLAUSIBLE),
    "/v1/chat/completions": st.fixed_dictionaries({"messages": MESSAGES}, optional=PLAUSIBLE),
    "/v1/feedback": st.fixed_dictionaries({"id": st.text(max_size=30)}, optional={
        "rating": st.sampled_from(["up", "down", "meh", None]), "correction": st.none() | SHORT_TEXT})}
ANY_FIELDS = st.fixed_dictionaries({}, optional={name: JSON_VALUES for name in FIELDS})  # any field, any value
REQUEST_BODIES = st.one_of(*WELL_FORMED.values(), ANY_FIELDS)


def encode_json(value) -> bytes:
    """JSON as a client would write it: lone surrogates as \\ud800 escapes, NaN and Infinity as Python writes them."""
    return json.dumps(value).encode()


BODIES = (st.binary(max_size=300) | JSON_VALUES.map(encode_json) | REQUEST_BODIES.map(encode_json)
          | REQUEST_BODIES.map(encode_json).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])))  # cut short
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain",
                                     "application/x-www-form-urlencoded", "multipart/form-data", "application/vnd+json",
                                     ""]) | HEADER_VALUE,
    "content-encoding": st.sampled_from(["gzip", "br", "deflate", "identity"]) | HEADER_VALUE,
    "authorization": st.sampled_from([f"Bearer {API_KEY}", f"bearer {API_KEY}", "Bearer", "Basic eDp5", ""])
                     | HEADER_VALUE,
    "accept": st.sampled_from(["text/event-stream", "application/json", "*/*"]) | HEADER_VALUE,
    "accept-encoding": st.sampled_from(["gzip", "br"]) | HEADER_VALUE,
    "x-request-id": HEADER_VALUE})
PATHS = st.sampled_from([op.split()[1] for op in OPERATIONS] + ["/openapi.json", "/v1", "/v1/completions/", "/docs"]) \
    | st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#?%"), max_size=20).map(
        lambda p: "/" + p.lstrip("/"))  # ("//x:" would be a host and port to the client, not a path)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


def test_raw_requests(keyed_client):
    tally: Counter = Counter()

    @given(method=METHODS, path=PATHS, headers=HEADERS, body=BODIES)
    @settings(FUZZ, max_examples=EXAMPLES * 12)
    def fuzz(method, path, headers, body):
        response = keyed_client.request(method, path, headers=headers, content=body if method != "GET" else None)
        label = f"{method} {path} {headers} {body[:200]!r}"
        check_answer(response.status_code, response.text, label, tally, has_body=method != "HEAD")
        if response.status_code == 200 and path in ("/v1/completions", "/v1/chat/completions"):
            assert headers.get("authorization", "").partition(" ")[2] == API_KEY  # the key check let only the key in

    fuzz()
    print(f"raw requests: {dict(tally)}")
    assert tally["5xx"] == 0


def test_request_fields_with_the_key(keyed_client):
    """The request fields with values of every type, as JSON, with the right key: past the key check, into the
    body's validation and the generation."""
    tally: Counter = Counter()

    @given(data=st.data(), path=st.sampled_from(sorted(WELL_FORMED)))
    @settings(FUZZ, max_examples=EXAMPLES * 8)
    def fuzz(data, path):
        body = data.draw(WELL_FORMED[path] | ANY_FIELDS if path != "/v1/feedback" else WELL_FORMED[path])
        response = keyed_client.post(path, content=encode_json(body), headers={
            "authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
        check_answer(response.status_code, response.text, f"POST {path} {encode_json(body)[:300]!r}", tally)

    fuzz()
    print(f"request fields: {dict(tally)}")
    assert tally["5xx"] == 0 and tally["requests"] > 0


def test_feedback_text(keyed_client):
    """Arbitrary ratings and corrections (lone surrogates included) for a response this server really sent."""
    key = {"authorization": f"Bearer {API_KEY}"}
    response_id = keyed_client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 2}, headers=key).json()["id"]
    tally: Counter = Counter()

    @given(rating=st.none() | st.sampled_from(["up", "down"]) | st.text(max_size=5), correction=st.none() | TEXT)
    @settings(FUZZ, max_examples=EXAMPLES * 2)
    def fuzz(rating, correction):
        body = encode_json({"id": response_id, "rating": rating, "correction": correction})
        response = keyed_client.post("/v1/feedback", content=body, headers={**key, "content-type": "application/json"})
        check_answer(response.status_code, response.text, f"feedback {body[:300]!r}", tally)

    fuzz()
    print(f"feedback: {dict(tally)}")
    assert tally["5xx"] == 0
