"""`lm serve`: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching.

    lm serve --ckpt_path checkpoints/wikitext2_cpu/last.ckpt                # http://127.0.0.1:8000
    lm serve --ckpt_path ... --port 9000 --max_batch_size 8 --sampling.temperature 0.7
    LM_API_KEY=secret lm serve --ckpt_path ... --host 0.0.0.0             # exposed: require a key
    lm serve --ckpt_path ... --blocklist words.txt --feedback_path logs/serve/feedback.jsonl

The checkpoint is the only model the server loads, chosen here at start: no request can name a
file. See lm/serve/app.py for the endpoints and lm/serve/engine.py for the batching.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from lm.errors import LMError
from lm.extras import require
from lm.io.checkpoints import load_model, read_checkpoint
from lm.model.sampling import SamplingOptions
from lm.runtime.hardware import resolve_inference_dtype
from lm.serve.engine import BatchEngine
from lm.serve.feedback import FeedbackLog
from lm.serve.filters import Blocklist, NoFilter

log = logging.getLogger("lm.serve")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, localhost. Anything else
    (0.0.0.0, ::, a LAN address, another host name) may be reachable by others."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve(
    ckpt_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: Optional[str] = None,
    max_batch_size: int = 16,
    max_waiting: int = 256,
    max_tokens: int = 512,
    max_prompt_tokens: Optional[int] = None,
    max_body_bytes: int = 1_000_000,
    sampling: Optional[SamplingOptions] = None,
    api_key: Optional[str] = None,
    feedback_path: Optional[str] = "logs/serve/feedback.jsonl",
    blocklist: Optional[str] = None,
    device: str = "cpu",
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    threads: Optional[int] = None,
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /info,
    /health, /metrics, /v1/feedback and a playground page at /.

    Args:
        ckpt_path: Checkpoint written by `lm fit`, e.g. checkpoints/<experiment>/last.ckpt.
        host: Address to listen on. The default answers this machine only. Any other address (0.0.0.0,
            ::, a LAN address) is refused unless an API key is set (LM_API_KEY or --api_key).
        port: TCP port.
        model_name: The model id clients send and /v1/models lists (default: <folder>/<file stem>).
        max_batch_size: Requests decoded together in one forward; more wait for a free slot.
        max_waiting: Requests allowed to wait; beyond that the server answers 429.
        max_tokens: The most tokens one request may ask for (also capped by the context).
        max_prompt_tokens: The longest prompt accepted, in tokens (default: the context minus one).
        max_body_bytes: Larger request bodies are refused with 413 without being read.
        sampling: Defaults for what a request leaves out (`--sampling.temperature 0.7`,
            `--sampling.max_new_tokens 64`, ...): SamplingOptions.
        api_key: Require `Authorization: Bearer <key>` on /v1/* and /info (default: $LM_API_KEY if
            set, else no key). /health and / stay open.
        feedback_path: JSONL file that POST /v1/feedback appends training examples to (null: off).
        blocklist: A file of words (one per line) masked as *** in every output.
        device: Where to run the model, e.g. cpu or cuda.
        dtype: float32 or bfloat16 weights; `auto`: as `lm generate` picks it for `max_batch_size` sequences
            decoded together (/info says which).
        threads: CPU threads for torch (default: torch's choice).
        log_level: Server log level; the request log is at info.
    """
    require("serve", "lm serve")  # fastapi, uvicorn, prometheus-client: one line naming the extra if missing
    if not ckpt_path:
        raise LMError("No checkpoint given: pass --ckpt_path, e.g. checkpoints/<experiment>/last.ckpt.")
    api_key = api_key or os.environ.get("LM_API_KEY") or None
    if api_key is None and not is_loopback(host):
        raise LMError(f"Refusing to listen on {host} without an API key (anyone who can reach the port could use "
                      f"the model): set one with LM_API_KEY=<secret> or --api_key <secret>, or listen on "
                      f"127.0.0.1 only (the default).")
    import uvicorn  # the serve extra: imported once `require` has checked it, so `lm serve --help` needs none

    from lm.serve.app import create_app  # FastAPI at its top: the serve extra

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = build_state(ckpt_path, model_name=model_name, max_batch_size=max_batch_size, max_waiting=max_waiting,
                        max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                        sampling=sampling, api_key=api_key, feedback_path=feedback_path, blocklist=blocklist,
                        device=device, dtype=dtype, threads=threads)
    state.engine.start()
    try:
        log.info("serving %s on http://%s:%d (batch slots: %d)", state.model_name, host, port, max_batch_size)
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, access_log=False)
    finally:
        state.engine.stop()


def build_state(ckpt_path: str, *, model_name: Optional[str] = None, max_batch_size: int = 16,
                max_waiting: int = 256, max_tokens: int = 512, max_prompt_tokens: Optional[int] = None,
                max_body_bytes: int = 1_000_000, sampling: Optional[SamplingOptions] = None,
                api_key: Optional[str] = None, feedback_path: Optional[str] = None,
                blocklist: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                threads: Optional[int] = None):
    """Load the checkpoint and build the server's `ServerState` (engine not started yet)."""
    from lm.serve.app import ServerState  # FastAPI at its top: the serve extra
    from lm.serve.protocol import Limits  # pydantic at its top: installed with the serve extra (fastapi)

    if threads is not None:
        torch.set_num_threads(threads)
    filter_ = Blocklist.from_file(blocklist) if blocklist else NoFilter()  # a bad file fails before the load
    feedback = FeedbackLog(feedback_path) if feedback_path else None  # so does a feedback file it cannot write
    path = Path(ckpt_path)
    dtype, chosen = resolve_inference_dtype(dtype, device, decode_rows=max_batch_size)
    if chosen:
        log.info(chosen)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, dtype))
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference()
    config = model.config
    info = {"config": config.to_dict() if hasattr(config, "to_dict") else vars(config),
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype, "device": device,
            "tokenizer": {"type": "byte-level BPE", "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
            "checkpoint": _checkpoint_info(path, read_checkpoint), "created": int(path.stat().st_mtime)}
    defaults = sampling or SamplingOptions()
    return ServerState(
        engine=BatchEngine(model, tokenizer, max_batch_size=max_batch_size, max_waiting=max_waiting,
                           context_cache=defaults.context_cache),
        tokenizer=tokenizer,
        limits=Limits(context=config.max_position_embeddings, max_tokens_cap=max_tokens,
                      max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                      max_token_bytes=max(len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size))),
        model_name=model_name or f"{path.resolve().parent.name}/{path.stem}",
        info=info, defaults=defaults, output_filter=filter_,
        feedback=feedback, api_key=api_key)


def _checkpoint_info(path: Path, read_checkpoint) -> dict:
    checkpoint = read_checkpoint(path)
    stat = path.stat()
    return {"file": path.name, "bytes": stat.st_size, "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))}
