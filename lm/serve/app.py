"""The HTTP side of `lm serve`: a FastAPI app in front of the continuous-batching `BatchEngine`.

Endpoints (OpenAI-compatible where OpenAI has one):
- POST /v1/completions, POST /v1/chat/completions: `stream: true` sends server-sent events, one
  chunk per text piece, the last with `finish_reason` and `usage`, then `data: [DONE]`.
- GET /v1/models, GET /info (config, parameters, tokenizer, checkpoint, engine, limits),
  GET /health, GET /metrics (Prometheus), POST /v1/feedback, GET / (the playground page),
  GET /openapi.json (the schema: what clients and tests/test_serve_fuzz.py read).
Errors are OpenAI-shaped (`{"error": {...}}`), FastAPI's own refusals included: 400 bad parameters (an unknown
field, or an OpenAI field this server does not implement, named: lm/serve/protocol.py; a body that is not UTF-8
JSON), 401 missing/wrong API key, 404 unknown model, response id or path, 405 a method the path does not take,
413 body too large, 429 queue full, 500 a failed generation
(the server keeps serving). A client that disconnects mid-stream cancels its request: its batch
slot is freed at the next decode step.

Why FastAPI and not LitServe (checked with litserve 0.2.19): its OpenAISpec serves only
/v1/chat/completions; with `max_batch_size` a batch is held until its longest member ends (the
maintainers' own caveat); its ContinuousBatchingLoop combined with OpenAISpec failed every request
("cannot pickle 'generator' object": the spec requires a generator `encode_response`, the loop
pickles what it returns); and nothing tells its inference worker that a client left: in our test the
worker kept decoding a disconnected stream to its end. Continuous batching, per-request sampling and
freeing a slot on disconnect are what this server is for, so the engine is ours and the HTTP layer
is FastAPI + uvicorn.
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm.model.sampling import SamplingOptions
from lm.serve.engine import BatchEngine, EngineBusy, Event, Finished, GenerationRequest, Piece
from lm.serve.feedback import FeedbackLog, RecentResponses, ServedResponse
from lm.serve.filters import NoFilter, OutputFilter
from lm.serve.prometheus import ServerMetrics
from lm.serve.middleware import BodySizeLimit, RequestLog
from lm.serve.protocol import (CHAT_STOP, ApiError, ChatMessage, ChatRequest, CompletionRequest, ErrorResponse,
                               FeedbackRequest, Limits, error_body, json_value, render_chat)


@dataclass
class ServerState:
    """Everything the endpoints share. Built by `lm serve` (lm/commands/serve.py) or a test."""

    engine: BatchEngine
    tokenizer: Any
    limits: Limits
    model_name: str
    info: dict[str, Any]  # the /info body (config, parameters, tokenizer, checkpoint)
    defaults: SamplingOptions = field(default_factory=SamplingOptions)
    output_filter: OutputFilter = field(default_factory=NoFilter)
    feedback: Optional[FeedbackLog] = None
    api_key: Optional[str] = None
    recent: RecentResponses = field(default_factory=RecentResponses)


# ------------------------------------------------------------------------------ one generation
class _Generation:
    """One request in flight: submits it to the engine and hands its events to the event loop."""

    def __init__(self, state: ServerState, request: Request, kind: str, prompt: str, instruction: str,
                 body: Union[CompletionRequest, ChatRequest], extra_stop: Optional[list[str]] = None):
        self.state, self.request, self.kind, self.instruction = state, request, kind, instruction
        self.prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.usage: dict[str, Any] = request.scope.setdefault("lm.usage", {})
        self.usage.update(id=self.id, stream=body.stream)
        state.limits.check_prompt_size(prompt, "messages" if kind == "chat" else "prompt")
        ids = state.tokenizer.encode(prompt)
        self.usage["prompt_tokens"] = len(ids)
        options = state.limits.sampling_options(body, len(ids), state.defaults, extra_stop)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.job = GenerationRequest(ids, options, self._push)
        self.filter = state.output_filter.stream()
        self.text: list[str] = []
        self.start = time.perf_counter()
        try:
            state.engine.submit(self.job)
        except EngineBusy as error:
            raise ApiError(429, str(error), type="server_busy", code="queue_full") from error

    def _push(self, event: Event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            self.job.cancel()

    async def events(self) -> AsyncIterator[tuple[str, Optional[Finished]]]:
        """(filtered text, None) per piece, then ("rest", Finished); raises ApiError(500) on failure."""
        while True:
            event = await self.queue.get()
            if isinstance(event, Piece):
                text = self.filter.feed(event.text)
                if text:
                    self.usage.setdefault("ttft_ms", round((time.perf_counter() - self.start) * 1000, 1))
                    self.text.append(text)
                    yield text, None
            elif isinstance(event, Finished):
                rest = self.filter.finish()
                self.text.append(rest)
                self.usage.update(completion_tokens=event.completion_tokens, finish_reason=event.reason)
                self._remember()
                yield rest, event
                return
            else:
                self.usage["finish_reason"] = "error"
                raise ApiError(500, event.message, type="server_error")

    def _remember(self) -> None:
        # A completion's prompt, or a chat's last user message, is the instruction; no separate input.
        self.state.recent.add(self.id, ServedResponse(self.instruction, "", "".join(self.text), self.state.model_name))

    def usage_body(self, finished: Finished) -> dict[str, int]:
        return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens}

    def choice(self, text: str, finish_reason: Optional[str], stream: bool) -> dict[str, Any]:
        if self.kind != "chat":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if stream:
            return {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}

    def envelope(self, choice: dict[str, Any], stream: bool, usage: Optional[dict] = None) -> dict[str, Any]:
        obj = {"chat": "chat.completion", "text": "text_completion"}[self.kind]
        body = {"id": self.id, "object": obj + (".chunk" if stream and self.kind == "chat" else ""),
                "created": self.created, "model": self.state.model_name, "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return body


async def _complete(gen: _Generation) -> Optional[dict[str, Any]]:
    """The whole response of a non-streaming request; None (and the request cancelled) if the client
    left meanwhile."""
    waiter = asyncio.ensure_future(_drain(gen))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                return waiter.result()
            if await gen.request.is_disconnected():
                gen.usage["finish_reason"] = "cancelled"
                return None
    finally:
        waiter.cancel()
        gen.job.cancel()  # no-op if it finished


async def _drain(gen: _Generation) -> dict[str, Any]:
    async for _, finished in gen.events():
        if finished is not None:
            return gen.envelope(gen.choice("".join(gen.text), finished.reason, stream=False), stream=False,
                                usage=gen.usage_body(finished))
    raise RuntimeError("generation ended without a result")


async def _stream(gen: _Generation) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece, the last with finish_reason and usage, then [DONE]."""
    try:
        async for text, finished in gen.events():
            reason = finished.reason if finished else None
            usage = gen.usage_body(finished) if finished else None
            if text or finished:
                yield f"data: {json.dumps(gen.envelope(gen.choice(text, reason, True), True, usage))}\n\n"
    except ApiError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
    else:
        yield "data: [DONE]\n\n"
    finally:  # also on disconnect: Starlette closes this generator, and the slot is freed
        if gen.usage.get("finish_reason") is None:
            gen.usage["finish_reason"] = "cancelled"
        gen.job.cancel()


async def _respond(gen: _Generation, stream: bool) -> Response:
    if stream:
        return StreamingResponse(_stream(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    body = await _complete(gen)
    if body is None:  # nobody to answer; 499 is the log's "client closed the request"
        return Response(status_code=499)
    return JSONResponse(body)


# ------------------------------------------------------------------------------------- the app
def _check_model(state: ServerState, name: Optional[str]) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(404, f"Model {name!r} is not served here; this server serves {state.model_name!r} "
                            f"(GET /v1/models).", "model", code="model_not_found")


def _playground_html() -> str:
    return resources.files("lm.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app; `state.engine` must be started (and stopped) by the caller."""
    # The schema is served (clients and fuzzers read it: tests/test_serve_fuzz.py); the interactive docs pages
    # are not, as they load scripts from a CDN.
    app = FastAPI(title="lm serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    metrics = ServerMetrics(state.engine)
    app.state.lm = state
    _add_error_handlers(app)
    guarded = [Depends(_key_checker(state))]
    _add_generation_routes(app, state, guarded)
    _add_info_routes(app, state, metrics, guarded)
    _add_feedback_route(app, state, metrics, guarded)
    _name_the_model_in_the_schema(app, state.model_name)
    # Outermost first: the log sees every answer, including the body cap's 413.
    app.add_middleware(BodySizeLimit, max_bytes=state.limits.max_body_bytes)
    app.add_middleware(RequestLog, metrics=metrics)
    return app


def _name_the_model_in_the_schema(app: FastAPI, model_name: str) -> None:
    """GET /openapi.json says which `model` the generation bodies take: the one served (or none: the default)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI builds it once and keeps it
        for body in ("CompletionRequest", "ChatRequest"):
            schema["components"]["schemas"][body]["properties"]["model"] = {
                "anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}], "title": "Model",
                "description": "The served model (GET /v1/models); null or left out: the same."}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _key_checker(state: ServerState):
    async def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                           type="authentication_error", code="invalid_api_key")
    return require_key


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":  # its "loc" is a character offset, not a field
            message = (f"Invalid request: the body is not valid JSON (error at character {first.get('loc', ('', '?'))[-1]}): "
                       f"send one JSON object, e.g. {{\"prompt\": \"Hello\"}}.")
            return JSONResponse(error_body(message), status_code=400)
        if isinstance(error.body, bytes) and error.body:  # FastAPI parses JSON only when the content type says so
            given = request.headers.get("content-type")
            sent = f"as {given}" if given else "without a Content-Type header"
            message = (f"Invalid request: the body was sent {sent}, not as JSON: send the header "
                       f"'Content-Type: application/json' (curl: -H 'Content-Type: application/json').")
            return JSONResponse(error_body(message), status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "extra_forbidden" and param:
            return JSONResponse(error_body(_unknown_field(request.url.path, param), param=param,
                                           code="unknown_parameter"), status_code=400)
        problem = str(first.get("msg", "malformed body")).removeprefix("Value error, ")  # a validator's own words
        message = f"Invalid request: {param + ': ' if param else ''}{problem}."
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own refusals (an unknown path, a method a path does not take, a body that is
        not UTF-8), in the OpenAI shape every other error has rather than FastAPI's `{"detail": ...}`."""
        return JSONResponse(error_body(_http_error_message(request, error), code=_HTTP_ERROR_CODES.get(error.status_code)),
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"Internal error: {error}", type="server_error"), status_code=500)


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def _http_error_message(request: Request, error: StarletteHTTPException) -> str:
    method, path = request.method, request.url.path
    if error.status_code == 404:
        return (f"Not found: {method} {path}. This server's endpoints: POST /v1/completions, POST /v1/chat/completions, "
                f"GET /v1/models, POST /v1/feedback, GET /info, GET /health, GET /metrics, GET /openapi.json, GET /.")
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        return f"{method} is not allowed on {path}: use {allowed or 'another method'}."
    if error.status_code == 400 and isinstance(error.__cause__, UnicodeDecodeError):
        return ("Invalid request: the body is not UTF-8 text, so it is no JSON: send one UTF-8 JSON object, "
                "e.g. {\"prompt\": \"Hello\"}.")
    detail = error.detail if isinstance(error.detail, str) else json_value(error.detail)
    return f"Invalid request: {detail}."


_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest, "/v1/feedback": FeedbackRequest}


def _unknown_field(path: str, param: str) -> str:
    """The message for a field the endpoint's body does not have (OpenAI refuses them too): its name, the
    closest field (`max_token`: did you mean max_tokens?) and every field the body takes."""
    parent, _, name = param.rpartition(".")
    body = _BODIES.get(path)
    if body is None:
        return f"Invalid request: unknown field {param!r}."
    fields = sorted(ChatMessage.model_fields if parent.startswith("messages") else body.model_fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return f"Unknown field {param!r}{guess}: it would be ignored, so it is refused. Fields: {', '.join(fields)}."


# What the OpenAPI schema (GET /openapi.json) says the endpoints answer besides their 200: every error in
# OpenAI's shape (FastAPI would otherwise declare its own 422 body, which this server never sends).
ERRORS: dict[Union[int, str], dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "A refused request: what was wrong and what to do"},
    "5XX": {"model": ErrorResponse, "description": "A generation that failed (the server goes on serving)"}}
GENERATED = {200: {"description": "The completion, or with `stream: true` server-sent events",
                   "content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


def _add_generation_routes(app: FastAPI, state: ServerState, guarded: list) -> None:
    @app.post("/v1/completions", dependencies=guarded, responses=GENERATED)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.refuse_unsupported()
        _check_model(state, body.model)
        prompt = body.prompt_text()
        return await _respond(_Generation(state, request, "text", prompt, prompt, body), body.stream)

    @app.post("/v1/chat/completions", dependencies=guarded, responses=GENERATED)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        body.refuse_unsupported()
        _check_model(state, body.model)
        prompt, instruction = render_chat(body.messages)
        gen = _Generation(state, request, "chat", prompt, instruction, body, extra_stop=[CHAT_STOP])
        return await _respond(gen, body.stream)


def _add_info_routes(app: FastAPI, state: ServerState, metrics: ServerMetrics, guarded: list) -> None:
    @app.get("/v1/models", dependencies=guarded, responses=ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model",
                                            "created": state.info.get("created", 0), "owned_by": "lm"}]}

    @app.get("/info", dependencies=guarded, responses=ERRORS)
    async def info() -> dict[str, Any]:
        engine, limits = state.engine, state.limits
        return {**state.info, "model": state.model_name,
                "engine": {"max_batch_size": engine.max_batch_size, "active_requests": engine.active_count,
                           "waiting_requests": engine.waiting_count, "decode_steps": engine.steps,
                           "tokens_generated": engine.tokens_generated},
                "limits": {"max_tokens": limits.max_tokens_cap, "max_prompt_tokens": limits.max_prompt_tokens,
                           "max_body_bytes": limits.max_body_bytes, "context": limits.context},
                "defaults": dict(vars(state.defaults))}

    @app.get("/health", responses={503: {"description": "The decode engine has stopped"}})
    async def health() -> JSONResponse:
        alive = state.engine.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": state.model_name},
                            status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = _playground_html()

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)


def _add_feedback_route(app: FastAPI, state: ServerState, metrics: ServerMetrics, guarded: list) -> None:
    @app.post("/v1/feedback", dependencies=guarded, responses=ERRORS)
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
        if body.rating is None and body.correction is None:
            raise ApiError(400, "Send a rating ('up' or 'down') and/or a correction.", "rating")
        served = state.recent.get(body.id)
        if served is None:
            raise ApiError(404, f"No recent response with id {body.id!r} (this server keeps the last "
                                f"{state.recent.capacity}).", "id", code="response_not_found")
        metrics.feedback.labels("correction" if body.correction is not None else body.rating).inc()
        written = False
        if state.feedback is not None:
            written = await asyncio.to_thread(state.feedback.append, body.id, served, body.rating, body.correction)
        request.scope["lm.usage"]["id"] = body.id
        return {"id": body.id, "recorded": True, "training_example": written}
