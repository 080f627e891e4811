#!/usr/bin/env python3
"""Embedding throughput: sentences/s of `POST /v1/embeddings` on the embedding tier
(all-MiniLM-L6-v2), at batch 1 (one sentence per request, one request at a time), at batch 64
(64 sentences per request), and with 16 clients sending one sentence each (what dynamic
batching gives concurrent single-sentence callers).

The script starts `ferrum serve` itself with a config holding only the embedding tier (its
weights found by `ferrum pull text-embedding-3-small`), warms it up, and runs each mode
`--repetitions` times, quoting medians. Sentences are synthetic, 10-20 words (about 15-25
tokens), the same in every mode.

    target/e2e-venv/bin/python scripts/bench_embed.py --ferrum-bin target/release/ferrum

Only the standard library and httpx are used. Benchmark on a quiet machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import start_server  # noqa: E402

MODEL = "text-embedding-3-small"
WORDS = ("the a service order customer quickly package arrived late refund window garden "
         "river engine battery morning report weekly meeting budget travel museum coffee "
         "project deadline update server latency memory network music library summer").split()


def sentences(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 20))).capitalize() + "."
            for _ in range(n)]


def weights_dir(binary: str) -> str:
    pull = subprocess.run([binary, "pull", MODEL], capture_output=True, text=True, check=True)
    for line in pull.stdout.splitlines():
        if line.startswith(f"{MODEL}: "):
            return line.split(": ", 1)[1].strip()
    sys.exit(f"no '{MODEL}: PATH' line in `ferrum pull`'s output: {pull.stdout!r}")


def embed(http: httpx.Client, texts: list[str]) -> None:
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": texts})
    r.raise_for_status()
    assert len(r.json()["data"]) == len(texts)


def sequential(base: str, texts: list[str], batch: int) -> float:
    """Sentences/s with requests of `batch` sentences, one at a time."""
    with httpx.Client(base_url=base, timeout=600) as http:
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            embed(http, texts[i:i + batch])
        return len(texts) / (time.perf_counter() - t0)


def concurrent(base: str, texts: list[str], clients: int) -> float:
    """Sentences/s with `clients` threads each sending one sentence per request."""
    todo = list(texts)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    text = todo.pop()
                embed(http, [text])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ferrum-bin", required=True)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    config = workdir / "ferrum.toml"
    config.write_text(
        f'[[tier]]\nid = "{MODEL}"\nkind = "embedding"\n'
        f'price = {{ input = 0.02, cached_input = 0.02, output = 0.0 }}\n'
        f'weights = {{ path = "{weights_dir(args.ferrum_bin)}" }}\n')
    proc, base = start_server(args.ferrum_bin, workdir, ["--config", str(config)])
    try:
        texts = sentences(args.sentences)
        with httpx.Client(base_url=base, timeout=600) as http:
            embed(http, texts[:64])  # load and warm up
        modes = {
            "batch 1 (one request at a time)": lambda: sequential(base, texts, 1),
            "batch 64 (64 per request)": lambda: sequential(base, texts, 64),
            "16 concurrent clients, 1 per request": lambda: concurrent(base, texts, 16),
        }
        runs: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repetitions):
            for name, mode in modes.items():
                runs[name].append(mode())
        print(f"{args.sentences} sentences, {args.repetitions} repetitions; load "
              f"{open('/proc/loadavg').read().split()[0]}")
        print("| mode | sentences/s (median) | runs |")
        print("|---|---|---|")
        for name, values in runs.items():
            print(f"| {name} | {statistics.median(values):.1f} | "
                  + ", ".join(f"{v:.1f}" for v in values) + " |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
