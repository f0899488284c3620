"""`lm serve`: an OpenAI-compatible HTTP API over a continuous-batching decode engine.

- engine.py      BatchEngine: one background decode loop; requests join and leave between steps
- protocol.py    request bodies, limits, the chat template, OpenAI-shaped errors
- app.py         the FastAPI app: endpoints, streaming (SSE), API key, feedback, playground
- middleware.py  body-size cap, request log
- prometheus.py  Prometheus metrics
- feedback.py    feedback -> append-only Alpaca JSONL
- filters.py     output filters (the moderation plug-in point): NoFilter, Blocklist
- static/        the playground page
"""
