"""Helpers for the `lm serve` tests: a tiny checkpoint in `lm fit`'s format (a few plain SGD
steps: enough to be a real checkpoint, not to write good text) and a server started as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from lm.data.tokenizer import Tokenizer
from lm.model import GPT, GPTConfig
from tests.conftest import make_corpus

CONTEXT = 64


def make_tiny_checkpoint(path: Path, steps: int = 20, context: int = CONTEXT) -> Path:
    """A 2-layer, 32-wide GPT with a 300-token BPE, saved as `lm fit` would (config, tokenizer, weights)."""
    text = make_corpus(40, seed=0)
    tokenizer = Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=context))
    ids = torch.tensor(tokenizer.encode(text))
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,))
        batch = torch.stack([ids[s:s + 33] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain SGD: torch.optim's first use imports the compiler stack (~10 s)
            for p in model.parameters():
                p -= 0.5 * p.grad
    torch.save({"hyper_parameters": {"config": model.config.to_dict()}, "tokenizer": tokenizer.to_str(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": steps,
                "epoch": 0}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lm serve ...` on 127.0.0.1 and a free port; waits for /health. `command` may add
    arguments that must come first (e.g. `--config FILE`, which later flags override)."""

    def __init__(self, ckpt: Path, workdir: Path, *args: str, env: dict | None = None,
                 command: tuple[str, ...] = ("lm", "serve")):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--ckpt_path", str(ckpt), "--port", str(self.port),
             "--host", "127.0.0.1", "--threads", "1", *args], cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()
