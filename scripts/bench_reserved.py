#!/usr/bin/env python3
"""Reserved capacity under overload: the time to first token of one project's requests while
another project floods the same model, with and without a reservation.

The script starts `ferrum serve` itself (fresh database, an admin key, the embedded default
tiers), creates two projects with the official SDK's admin API, and measures the "steady"
project's streamed requests (a short prompt, 16 tokens, one at a time) in three phases:

1. alone;
2. while the "flood" project keeps `--flood` long requests in flight (each 256 tokens), the
   steady project without a reservation;
3. the same flood, the steady project with `reserved_tokens_per_1_minute` set on the model.

It prints TTFT median and p90 per phase. `--max-running` bounds the sequences generated
together, so the flood fills the batch and queues behind it.

    target/e2e-venv/bin/python scripts/bench_reserved.py --ferrum-bin target/release/ferrum

Benchmark on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import start_server  # noqa: E402

ADMIN_KEY = "sk-admin-bench-reserved-0123456789abcdefghijklmnop"
PROMPT = [{"role": "user", "content": "Say hello."}]
FLOOD_PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]
BAN_EOS = {"0": -100, "2": -100}


def ttft(client: openai.OpenAI, model: str) -> float:
    """Seconds from sending a streamed request to its first content."""
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=16,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            # The rest is not read: the server sees the client leave and stops.
            return time.perf_counter() - t0
    return time.perf_counter() - t0


def measure(client: openai.OpenAI, model: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(ttft(client, model))
        time.sleep(0.2)
    return out


class Flood:
    """`width` threads each keeping one long request in flight until stopped."""

    def __init__(self, client: openai.OpenAI, model: str, width: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(client, model)) for _ in range(width)]
        for t in self.threads:
            t.start()

    def run(self, client: openai.OpenAI, model: str) -> None:
        while not self.stop.is_set():
            try:
                client.chat.completions.create(model=model, messages=FLOOD_PROMPT, max_tokens=256,
                                               temperature=0.7, logit_bias=BAN_EOS)
            except openai.APIError:
                time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return f"| {name} | {1000 * statistics.median(xs):.0f} | {1000 * p90:.0f} | {len(xs)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ferrum-bin", required=True)
    parser.add_argument("--model", default="gpt-4.1-nano")
    parser.add_argument("--flood", type=int, default=12, help="flood requests in flight")
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="measured requests per phase")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-reserved-"))
    proc, base = start_server(args.ferrum_bin, workdir, [
        "--admin-key", ADMIN_KEY, "--max-running", str(args.max_running)])
    try:
        admin = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", admin_api_key=ADMIN_KEY)
        org = admin.admin.organization
        keys = {}
        for name in ("steady", "flood"):
            project = org.projects.create(name=name)
            account = org.projects.service_accounts.create(project.id, name=name)
            keys[name] = (project.id, account.api_key.value)
        steady = openai.OpenAI(base_url=f"{base}/v1", api_key=keys["steady"][1], max_retries=0)
        flooder = openai.OpenAI(base_url=f"{base}/v1", api_key=keys["flood"][1], max_retries=5)
        steady.chat.completions.create(model=args.model, messages=PROMPT, max_tokens=2)  # warm

        rows = [summary("alone", measure(steady, args.model, args.requests))]
        flood = Flood(flooder, args.model, args.flood)
        try:
            time.sleep(3)
            rows.append(summary(f"{args.flood} flood requests in flight, no reservation",
                                measure(steady, args.model, args.requests)))
            org.projects.rate_limits.update_rate_limit(
                f"rl-{args.model}", project_id=keys["steady"][0],
                extra_body={"reserved_tokens_per_1_minute": 1_000_000})
            rows.append(summary(f"{args.flood} flood requests in flight, reserved",
                                measure(steady, args.model, args.requests)))
        finally:
            flood.close()
        load = open("/proc/loadavg").read().split()[0]
        print(f"{args.model}, --max-running {args.max_running}, load {load} at the end")
        print("| steady project's requests | TTFT median (ms) | TTFT p90 (ms) | n |")
        print("|---|---|---|---|")
        print("\n".join(rows))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
