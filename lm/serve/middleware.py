"""ASGI middleware of `lm serve`: a request-body cap and the request log.

What this file does:
- `BodySizeLimit`: refuses a body over `max_bytes` with 413 and an OpenAI-shaped error, from its
  Content-Length header when there is one, else as soon as the received chunks pass the cap. At
  most `max_bytes` are ever held in memory: a huge upload is refused, not read.
- `RequestLog`: one JSON log line per request (id, path, status, tokens in/out, latency, time to
  first token) on the `lm.serve.requests` logger, and the Prometheus request counters. The endpoint
  fills in `scope["lm.usage"]` (a dict) as it goes; the line is written when the response ends, so a
  stream is logged with its full length.
Both are plain ASGI (not BaseHTTPMiddleware), so streaming and client disconnects pass through.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from lm.serve.protocol import error_body

request_log = logging.getLogger("lm.serve.requests")


async def _send_json(send: Callable, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> dict[str, Any]:
        return error_body(f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
                          code="request_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_json(send, 413, self._too_large())
        # Read the body here (up to the cap), then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, self._too_large())
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class RequestLog:
    def __init__(self, app: Callable, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        usage: dict[str, Any] = {}
        scope["lm.usage"] = usage
        status = 500  # if the app fails before it answers

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            latency = time.perf_counter() - start
            path = scope["path"]
            self.metrics.observe_request(path, status, latency, usage)
            if path not in ("/health", "/metrics"):  # probes and scrapes would drown the log
                record = {"id": usage.get("id"), "method": scope["method"], "path": path, "status": status,
                          "prompt_tokens": usage.get("prompt_tokens"),
                          "completion_tokens": usage.get("completion_tokens"),
                          "latency_ms": round(latency * 1000, 1), "ttft_ms": usage.get("ttft_ms"),
                          "stream": usage.get("stream"), "finish_reason": usage.get("finish_reason")}
                request_log.info(json.dumps(record))
