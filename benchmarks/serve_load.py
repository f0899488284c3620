"""Load test of `lm serve` on loopback: N concurrent clients, then one client at a time, same server.

    python benchmarks/serve_load.py --ckpt_path checkpoints/wikitext2_cpu/last.ckpt
    python benchmarks/serve_load.py --ckpt_path ... --clients 16 --duration 60 --max_tokens 64

It starts `lm serve` (127.0.0.1, a free port, `--max_batch_size` = clients) as a subprocess, then runs
two phases of `--duration` seconds each with the same request mix (half streaming, half not; prompts
from a fixed list; sampled with temperature 0.8 and a per-request seed):
  1. `--clients` threads, each sending one request after another (the batching engine's case);
  2. one client (every request alone in its batch: the no-batching reference).
No new request starts after the deadline; the ones in flight finish (bounded by --max_tokens).
Printed per phase: requests/s, generated tokens/s, latency and time-to-first-token (streams)
p50/p95/p99, errors; the server's RSS before and after; the tokens/s ratio of the two phases; the
CPU and the load average (on a shared machine the figures are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.serve_support import ServerProcess  # noqa: E402  (same start-and-wait helper as the tests)

PROMPTS = [" = Valkyria Chronicles III = \n", " The game was released in", " In 1996 , the band", " The river",
           " = = History = = \n", " He was born in", " The album received", " The city of"]


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    requests: int = 0
    elapsed: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(client: httpx.Client, i: int, max_tokens: int, phase: Phase) -> None:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "stream": i % 2 == 0}
    start, ttft, tokens = time.perf_counter(), None, 0
    try:
        if body["stream"]:
            with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if ttft is None and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - start
                    tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
        else:
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            tokens = r.json()["usage"]["completion_tokens"]
    except Exception as error:  # counted, and the load goes on
        with phase.lock:
            phase.errors += 1
        print(f"  error: {error}", file=sys.stderr)
        return
    with phase.lock:
        phase.requests += 1
        phase.tokens += tokens
        phase.latencies.append(time.perf_counter() - start)
        if ttft is not None:
            phase.ttfts.append(ttft)


def run_phase(url: str, clients: int, duration: float, max_tokens: int, seed_base: int) -> Phase:
    phase, deadline, counter = Phase(), time.perf_counter() + duration, iter(range(seed_base, 10**9))
    counter_lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.perf_counter() < deadline:
                with counter_lock:
                    i = next(counter)
                one_request(client, i, max_tokens, phase)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.elapsed = time.perf_counter() - start
    return phase


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def report(name: str, phase: Phase) -> dict:
    row = {"phase": name, "requests": phase.requests, "errors": phase.errors, "seconds": round(phase.elapsed, 1),
           "req_per_s": round(phase.requests / phase.elapsed, 2), "tokens_per_s": round(phase.tokens / phase.elapsed, 1)}
    for label, values in (("latency", phase.latencies), ("ttft", phase.ttfts)):
        for q in (50, 95, 99):
            row[f"{label}_p{q}_ms"] = round(percentile(values, q) * 1000)
    print(json.dumps(row))
    return row


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--workdir", default="logs/serve_load")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), load average {os.getloadavg()}, server threads {args.threads}")
    server = ServerProcess(Path(args.ckpt_path).resolve(), workdir, "--max_batch_size", str(args.clients),
                           "--threads", str(args.threads), "--max_tokens", str(args.max_tokens), "--feedback_path", "null")
    try:
        run_phase(server.url, 2, min(5.0, args.duration), 8, seed_base=10**8)  # warm-up, not reported
        rss_before = rss_mb(server.proc.pid)
        batched = report(f"{args.clients} clients", run_phase(server.url, args.clients, args.duration, args.max_tokens, 0))
        rss_after = rss_mb(server.proc.pid)
        alone = report("1 client", run_phase(server.url, 1, args.duration, args.max_tokens, 10**6))
        rss_end = rss_mb(server.proc.pid)
    finally:
        server.stop()
    print(json.dumps({"rss_mb_before": round(rss_before, 1), "rss_mb_after_concurrent": round(rss_after, 1),
                      "rss_mb_after_all": round(rss_end, 1),
                      "tokens_per_s_ratio": round(batched["tokens_per_s"] / max(alone["tokens_per_s"], 1e-9), 2),
                      "load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
