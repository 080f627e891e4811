#!/usr/bin/env python3
"""Batch API throughput benchmark: the same chat requests sent as one batch (`/v1/files` +
`/v1/batches`) versus sent interactively by N concurrent clients.

The script starts `ferrum serve` itself (a fresh SQLite database and data directory in a temporary
directory, the weights of the embedded default configuration), then for each run:

1. interactive: `--requests` non-streamed chat completions from `--concurrency` closed-loop
   clients; wall time from the first request sent to the last response received;
2. batch: the same requests as a JSONL file; wall time from `POST /v1/batches` to the batch's
   `completed` status (polled every 0.2 s), which includes validation and writing the output.

It reports output tokens/s (completion tokens / wall time) of both, and their ratio, per run and
as medians. Every request has a distinct prompt, `temperature` 0, `max_tokens` `--max-tokens` and
a `logit_bias` of -100 on the end-of-generation tokens, so each generates exactly `--max-tokens`
tokens and both modes do the same work.

    target/e2e-venv/bin/python scripts/bench_batch.py --ferrum-bin target/release/ferrum \\
        --model gpt-4.1-nano --requests 200 --concurrency 8 --runs 3 --threads 2

Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

LISTEN_LINE = re.compile(r"^ferrum listening on (http://\S+)$")
BAN = {
    "gpt-4.1-nano": [0, 2],
    "gpt-4.1-mini": [151643, 151645],
    "gpt-4.1": [151643, 151645],
}
TOPICS = [
    "lighthouses", "umbrellas", "volcanoes", "chess", "snow", "railways", "bees", "divers",
    "clocks", "caravans", "robots", "bakeries", "glaciers", "circuses", "violins", "maps",
    "mirrors", "comets", "bookshops", "rescue dogs",
]


def bodies(model: str, n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append({
            "model": model,
            "messages": [{"role": "user", "content": f"Request {i}: tell me about {topic}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": {str(t): -100 for t in BAN.get(model, [])},
        })
    return out


def start_server(binary: str, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [binary, "serve", "--addr", "127.0.0.1:0",
           "--database", f"sqlite://{workdir / 'ferrum.db'}", *extra]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    m = LISTEN_LINE.match(line)
    if not m:
        proc.kill()
        sys.exit(f"ferrum did not start: {line!r}; see {workdir / 'server.log'}")
    return proc, m.group(1)


def interactive(base: str, reqs: list[dict], concurrency: int) -> tuple[float, int]:
    todo = list(enumerate(reqs))
    lock = threading.Lock()
    tokens = [0]
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    _, body = todo.pop(0)
                r = http.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                with lock:
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"interactive request failed: {errors[0]}")
    return wall, tokens[0]


def batch(base: str, reqs: list[dict], run: int) -> tuple[float, int]:
    lines = "".join(
        json.dumps({"custom_id": f"r{run}-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body}) + "\n"
        for i, body in enumerate(reqs)
    )
    with httpx.Client(base_url=base, timeout=600) as http:
        up = http.post("/v1/files", data={"purpose": "batch"},
                       files={"file": ("bench.jsonl", lines.encode())})
        up.raise_for_status()
        t0 = time.perf_counter()
        b = http.post("/v1/batches", json={"input_file_id": up.json()["id"],
                                           "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"}).json()
        while b["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
            b = http.get(f"/v1/batches/{b['id']}").json()
        wall = time.perf_counter() - t0
        if b["status"] != "completed" or b["request_counts"]["failed"]:
            sys.exit(f"batch did not complete cleanly: {b}")
        return wall, b["usage"]["output_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrum-bin", default="target/release/ferrum")
    ap.add_argument("--model", default="gpt-4.1-nano")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `ferrum serve` argument (repeatable), e.g. --server-arg=--max-running=32")
    args = ap.parse_args()
    extra = list(args.server_arg)
    if args.threads:
        extra += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args.ferrum_bin, Path(tmp), extra)
        try:
            reqs = bodies(args.model, args.requests, args.max_tokens)
            # Warm-up: load pages of the weights, fill nothing in the prefix cache that matters.
            interactive(base, reqs[:4], 4)
            rows = []
            for run in range(args.runs):
                # Distinct prompts per run, so no run reuses another's cached prefixes.
                run_reqs = [dict(b, messages=[{"role": "user", "content": f"Run {run}. " + b["messages"][0]["content"]}])
                            for b in reqs]
                iw, it = interactive(base, run_reqs, args.concurrency)
                run_reqs = [dict(b, messages=[{"role": "user", "content": f"Batch run {run}. " + b["messages"][0]["content"]}])
                            for b in reqs]
                bw, bt = batch(base, run_reqs, run)
                rows.append((it / iw, bt / bw, iw, bw))
                print(f"run {run + 1}: interactive c={args.concurrency}: {it} tokens in {iw:.1f} s = "
                      f"{it / iw:.1f} tok/s; batch: {bt} tokens in {bw:.1f} s = {bt / bw:.1f} tok/s; "
                      f"ratio {bt / bw / (it / iw):.2f}x", flush=True)
            med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
            print(f"median: interactive {med(0):.1f} tok/s ({med(2):.1f} s), batch {med(1):.1f} tok/s "
                  f"({med(3):.1f} s), ratio {statistics.median(r[1] / r[0] for r in rows):.2f}x")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
