"""Prometheus metrics of `lm serve` (served at `/metrics` in the text exposition format).

- lm_requests_total{path,status}, lm_request_latency_seconds{path}: every HTTP request.
- lm_prompt_tokens_total, lm_completion_tokens_total, lm_time_to_first_token_seconds: generation.
- lm_active_requests (slots in use), lm_waiting_requests, lm_batch_slots, lm_decode_steps_total:
  the engine, read when scraped.
- lm_feedback_total{rating}: feedback received (up, down, correction).
Each server has its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from lm.serve.engine import BatchEngine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_KNOWN_PATHS = {"/", "/health", "/metrics", "/info", "/v1/models", "/v1/completions", "/v1/chat/completions",
                "/v1/feedback"}


class _EngineCollector:
    def __init__(self, engine: BatchEngine):
        self.engine = engine

    def collect(self):
        steps = CounterMetricFamily("lm_decode_steps", "Shared decode forwards run by the batching engine.")
        steps.add_metric([], self.engine.steps)
        yield steps


class ServerMetrics:
    def __init__(self, engine: BatchEngine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lm_requests", "HTTP requests by path and status.", ["path", "status"],
                                registry=registry)
        self.latency = Histogram("lm_request_latency_seconds", "Request latency (to the end of a stream).",
                                 ["path"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("lm_time_to_first_token_seconds", "Time to the first generated text.",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("lm_prompt_tokens", "Prompt tokens of generation requests.", registry=registry)
        self.completion_tokens = Counter("lm_completion_tokens", "Generated tokens.", registry=registry)
        self.feedback = Counter("lm_feedback", "Feedback received, by kind.", ["rating"], registry=registry)
        Gauge("lm_active_requests", "Requests holding a batch slot.",
              registry=registry).set_function(lambda: engine.active_count)
        Gauge("lm_waiting_requests", "Requests waiting for a slot.",
              registry=registry).set_function(lambda: engine.waiting_count)
        Gauge("lm_batch_slots", "Batch slots (max concurrent generations).",
              registry=registry).set_function(lambda: engine.max_batch_size)
        registry.register(_EngineCollector(engine))

    def observe_request(self, path: str, status: int, latency: float, usage: dict[str, Any]) -> None:
        path = path if path in _KNOWN_PATHS else "other"  # bounded label values: no path from a client
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(latency)
        if usage.get("prompt_tokens"):
            self.prompt_tokens.inc(usage["prompt_tokens"])
        if usage.get("completion_tokens"):
            self.completion_tokens.inc(usage["completion_tokens"])
        if usage.get("ttft_ms") is not None:
            self.ttft.observe(usage["ttft_ms"] / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
