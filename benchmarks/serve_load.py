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

    python benchmarks/serve_load.py --ckpt_path ... --chaos --clients 32 --duration 60

`--chaos` instead mixes, for `--duration` seconds from `--clients` threads, well-formed greedy requests
(streaming or not, each checked against the server's own answer to that prompt when it was alone),
clients that disconnect mid-request (streams cut after their first chunk), and malformed requests (bad JSON,
wrong types, out-of-range sampling values, huge max_tokens and seeds, an unknown model or path, ~900 KB prompts
under the body cap but far over the context, lone UTF-16 surrogates escaped in JSON, bodies that are not UTF-8,
an oversized body, raw garbage on the socket, a body cut short), each expecting its 4xx in OpenAI's error shape.
It prints how many of each, how many well-formed answers were wrong, every unexpected status, the 5xx count,
the server's RSS (/proc/<pid>/status: at the start, after `--warmup` seconds of load, peak, at the end) and
whether the server is still healthy with no request left in its engine; it exits with status 1 if the server
crashed, any answer was unexpected, or RSS grew more than `--max_rss_growth_mb` (50) after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
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
    parser.add_argument("--chaos", action="store_true",
                        help="well-formed, disconnecting and malformed requests mixed (see above)")
    parser.add_argument("--seed", type=int, default=0, help="--chaos: the random mix")
    parser.add_argument("--well_formed_share", type=float, default=0.60,
                        help="--chaos: share of well-formed requests; the rest are adversarial")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="--chaos: seconds of load before the RSS baseline is taken")
    parser.add_argument("--max_rss_growth_mb", type=float, default=50.0,
                        help="--chaos: fail if the server's RSS grows more than this after the warm-up")
    args = parser.parse_args()
    if args.chaos:
        sys.exit(0 if run_chaos(args) else 1)
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


# ---------------------------------------------------------------------------------------- chaos
MAX_BODY_BYTES = 1_000_000  # the chaos server's --max_body_bytes (lm serve's default): the oversized body is above it
BIG_PROMPT = "The river was built in the north of England . " * 19_000  # ~900 KB: under the cap, far over the context


@dataclass
class Chaos:
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # the first few unexpected answers, printed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if problem and len(self.problems) < 20:
                self.problems.append(problem)

    def attempt(self, key: str, description: str, action) -> None:
        """Run `action()`: counted as `key`, or as `<key>_unexpected` with the error if it raises."""
        try:
            action()
        except Exception as error:
            self.count(f"{key}_unexpected", f"{description}: {error!r}")
            return
        self.count(key)


def greedy_body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def completion_text(client: httpx.Client, body: dict) -> str:
    """The text of a completion, streamed or not (raises on an HTTP or in-stream error)."""
    if not body["stream"]:
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    pieces = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                pieces.append(chunk["choices"][0]["text"])
    return "".join(pieces)


def well_formed(client: httpx.Client, rng: random.Random, chaos: Chaos, expected: dict, max_tokens: int) -> None:
    prompt = rng.choice(PROMPTS)
    try:
        text = completion_text(client, greedy_body(prompt, max_tokens, stream=rng.random() < 0.5))
    except Exception as error:
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code >= 500:
            chaos.count("http_5xx")
        chaos.count("well_formed_failed", f"well-formed request failed: {error!r}")
        return
    if text == expected[prompt]:
        chaos.count("well_formed_correct")
    else:
        chaos.count("well_formed_wrong", f"{prompt!r}: got {text!r}, expected {expected[prompt]!r}")


def disconnect(url: str, rng: random.Random, chaos: Chaos, max_tokens: int) -> None:
    """Leave mid-request: a stream closed after its first chunk, or a plain request given up on."""
    body = greedy_body(rng.choice(PROMPTS), max_tokens, stream=rng.random() < 0.5)

    def leave() -> None:
        try:
            with httpx.Client(base_url=url, timeout=rng.uniform(0.01, 0.3)) as client:
                if body["stream"]:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        next(r.iter_lines(), None)
                else:
                    client.post("/v1/completions", json=body)
        except httpx.TimeoutException:
            pass  # given up on: the point

    chaos.attempt("disconnects", "disconnecting client", leave)


MALFORMED = [  # (path, body: dict = JSON, bytes = sent as is, expected status)
    ("/v1/completions", {"prompt": BIG_PROMPT, "max_tokens": 4}, 400),  # issue 29: 34 MB of RSS each, before
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG_PROMPT}]}, 400),
    ("/v1/completions", b'{"prompt": "The river \\ud800 and \\udfff", "max_tokens": 4}', 400),  # lone surrogates
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400),
    ("/v1/completions", b'{"prompt": "caf\xe9 au lait"}', 400),  # not UTF-8
    ("/v1/completions", {"prompt": "The", "max_tokens": 2**70}, 400),
    ("/v1/completions", {"prompt": "The", "seed": 2**64}, 400),
    ("/v1/completions", {"prompt": "The", "logprobs": 5}, 400),
    ("/v1/completions", {"prompt": ["The", "A"]}, 400),
    ("/v1/nothing-here", {"prompt": "The"}, 404),
    ("/v1/completions", b'{"prompt": "The river", "max_tokens": ', 400),
    ("/v1/completions", {"prompt": 5, "max_tokens": 4}, 400),
    ("/v1/completions", {"prompt": "The", "max_tokens": "lots"}, 400),
    ("/v1/completions", {"prompt": "The", "max_tokens": -3}, 400),
    ("/v1/completions", {"prompt": "The", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"prompt": "The", "temperature": 9}, 400),
    ("/v1/completions", {"prompt": "The", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400),
    ("/v1/completions", {"prompt": "The", "model": "no-such-model"}, 404),
    ("/v1/completions", {"prompt": "x" * (MAX_BODY_BYTES + 1000)}, 413),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": 3}]}, 400),
    ("/v1/feedback", {"id": "no-such-response", "rating": "up"}, 404),
]


def malformed(url: str, rng: random.Random, chaos: Chaos) -> None:
    path, body, expected = rng.choice(MALFORMED)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = client.post(path, json=body)
        ok = r.status_code == expected and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
    except Exception as error:
        chaos.count("malformed_unexpected", f"{path} {str(body)[:60]!r}: {error!r}")
        return
    if r.status_code >= 500:
        chaos.count("http_5xx")
    chaos.count("malformed_refused" if ok else "malformed_unexpected",
                None if ok else f"{path} {str(body)[:60]!r}: {r.status_code} {r.text[:200]!r}, expected {expected}")


def broken_http(url: str, rng: random.Random, chaos: Chaos) -> None:
    """Bytes that are not HTTP, or a request whose body never fully arrives, then the socket closes."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    garbage = [b"\x00\xffNOT HTTP AT ALL\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n{\"prompt\": \"The"]

    def send() -> None:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(rng.choice(garbage))
            sock.settimeout(0.5)
            try:
                sock.recv(1024)  # a 400 for garbage; nothing for the cut body: either is fine
            except socket.timeout:
                pass

    chaos.attempt("broken_http", "raw socket", send)


def chaos_client(url: str, seed: int, deadline: float, chaos: Chaos, expected: dict, max_tokens: int,
                 well_formed_share: float = 0.60) -> None:
    """One of the clients: `well_formed_share` (60%) well-formed; the rest 3:4:1 disconnects, malformed requests and
    broken HTTP (15%, 20%, 5% at the default)."""
    rng = random.Random(seed)
    adversarial = 1.0 - well_formed_share
    # httpx keeps an idle connection 5 s, exactly as long as uvicorn does: a request sent on one the server has
    # just closed ends in "connection reset" with no HTTP status. A client drops idle connections first.
    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(keepalive_expiry=2.0)) as client:
        while time.perf_counter() < deadline:
            roll = rng.random()
            if roll < well_formed_share:
                well_formed(client, rng, chaos, expected, max_tokens)
            elif roll < well_formed_share + adversarial * 3 / 8:
                disconnect(url, rng, chaos, max_tokens)
            elif roll < well_formed_share + adversarial * 7 / 8:
                malformed(url, rng, chaos)
            else:
                broken_http(url, rng, chaos)


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """(seconds since the load began, RSS in MB) every half second, from /proc/<pid>/status."""
    start = time.perf_counter()
    while not stop.wait(0.5):
        try:
            samples.append((time.perf_counter() - start, rss_mb(pid)))
        except (OSError, StopIteration):  # the process is gone: reported as a crash
            return


def settled_engine(url: str, timeout: float = 60) -> dict:
    """/info's engine figures once no request is active or waiting (abandoned ones leave at the next step)."""
    deadline = time.perf_counter() + timeout
    while True:
        engine = httpx.get(url + "/info", timeout=10).json()["engine"]
        if (engine["active_requests"] == 0 and engine["waiting_requests"] == 0) or time.perf_counter() > deadline:
            return engine
        time.sleep(0.2)


def run_chaos(args) -> bool:
    """The --chaos run; True when the server survived and answered every well-formed request correctly."""
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    from lm.runtime.hardware import describe_cpu

    print(f"CPU: {describe_cpu()}, load average {os.getloadavg()}, server threads {args.threads}")
    server = ServerProcess(Path(args.ckpt_path).resolve(), workdir, "--max_batch_size", str(args.clients),
                           "--threads", str(args.threads), "--max_tokens", str(args.max_tokens), "--feedback_path",
                           "null", "--max_body_bytes", str(MAX_BODY_BYTES))
    chaos, samples, stop = Chaos(), [], threading.Event()
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:  # each prompt alone: the reference
            expected = {p: completion_text(client, greedy_body(p, args.max_tokens, stream=False)) for p in PROMPTS}
        rss_start = rss_mb(server.proc.pid)
        sampler = threading.Thread(target=sample_rss, args=(server.proc.pid, stop, samples), daemon=True)
        sampler.start()
        deadline = time.perf_counter() + args.duration
        threads = [threading.Thread(target=chaos_client, args=(server.url, args.seed * 1000 + i, deadline, chaos, expected,
                                                               args.max_tokens, args.well_formed_share))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = server.proc.poll() is None
        healthy = alive and httpx.get(server.url + "/health", timeout=10).status_code == 200
        engine = settled_engine(server.url) if healthy else {}
        rss_end = rss_mb(server.proc.pid) if alive else float("nan")
    finally:
        stop.set()
        server.stop()
    chaos.counts["reference_chars_min"] = min(len(text) for text in expected.values())  # answers are not empty
    return chaos_report(args, chaos, healthy, engine, rss_start, samples, rss_end)


def rss_after_warmup(samples: list[tuple[float, float]], warmup: float, fallback: float) -> float:
    """The first RSS sample at or after `warmup` seconds of load: the working set of a full batch, the allocator's
    arenas and the tokenizer's caches are in place by then, so what grows after it is what the load leaks."""
    return next((rss for t, rss in samples if t >= warmup), samples[-1][1] if samples else fallback)


def chaos_report(args, chaos: Chaos, healthy: bool, engine: dict, rss_start: float,
                 samples: list[tuple[float, float]], rss_end: float) -> bool:
    for problem in chaos.problems:
        print(f"  unexpected: {problem}", file=sys.stderr)
    counts = chaos.counts
    unexpected = sum(v for k, v in counts.items() if k.endswith(("_unexpected", "_wrong", "_failed")))
    requests = sum(v for k, v in counts.items() if k.startswith(("well_formed", "disconnects", "malformed", "broken_http")))
    warm = rss_after_warmup(samples, args.warmup, rss_start)
    growth = max((rss for t, rss in samples if t >= args.warmup), default=rss_end) - warm
    growth = max(growth, rss_end - warm)
    adversarial = sum(v for k, v in counts.items() if k.startswith(("disconnects", "malformed", "broken_http")))
    summary = {"clients": args.clients, "seconds": args.duration, "requests": requests, "adversarial": adversarial,
               **dict(sorted(counts.items())),
               "http_5xx": counts.get("http_5xx", 0), "server_alive_and_healthy": healthy, "crashes": 0 if healthy else 1,
               "engine_after": {k: engine.get(k) for k in ("active_requests", "waiting_requests", "decode_steps")},
               "rss_mb_start": round(rss_start, 1), "warmup_seconds": args.warmup,
               "rss_mb_after_warmup": round(warm, 1), "rss_mb_peak": round(max((r for _, r in samples), default=rss_start), 1),
               "rss_mb_end": round(rss_end, 1), "rss_growth_mb_after_warmup": round(growth, 1),
               "unexpected_answers": unexpected, "load_average_after": os.getloadavg()}
    print(json.dumps(summary))
    flat = growth <= args.max_rss_growth_mb
    if not flat:
        print(f"RSS grew {growth:.1f} MB after warm-up (limit {args.max_rss_growth_mb} MB)", file=sys.stderr)
    return healthy and unexpected == 0 and engine.get("active_requests") == 0 and flat


if __name__ == "__main__":
    main()
