#!/usr/bin/env python3
"""Soak test: `ferrum serve` under steady concurrent load for a long time, watching its memory.

Starts ferrum on a GGUF (default: nano's, via `ferrum pull`), keeps `--concurrency` streamed chat
requests in flight for `--minutes` (short, distinct prompts, so prompts keep filling the KV pool
and the prefix cache), and every `--every` seconds samples the server's RSS (/proc) and the KV
gauges of /metrics. The report is a table over time and a verdict: RSS must plateau, i.e. over
the last quarter of the run it may grow by at most `--growth-pct` (default 5%; the KV pool is
touched lazily, so RSS first climbs while its blocks fill, then must stop), and no request may
fail. Exit status 1 otherwise.

    scripts/soak.py --ferrum-bin target/release/ferrum --minutes 20 --concurrency 16
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(client: httpx.Client, base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get(f"{base}/metrics").text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        key = name.split("{")[0]
        if key in ("ferrum_kv_blocks_used", "ferrum_kv_blocks_cached", "ferrum_kv_blocks_total",
                   "ferrum_kv_cache_bytes", "ferrum_running_sequences",
                   "ferrum_generated_tokens_total"):
            out[key] = out.get(key, 0.0) + float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrum-bin", type=Path, default=bs.REPO_ROOT / "target/release/ferrum")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--model", default="gpt-4.1-nano")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--growth-pct", type=float, default=5.0)
    ap.add_argument("--ferrum-args", default="", help="extra `ferrum serve` arguments")
    args = ap.parse_args()

    if args.gguf is None:
        args.ferrum_bin = args.ferrum_bin
        args.llama_server = None
        args.gguf = bs.default_gguf(args)
    work = Path(tempfile.mkdtemp(prefix="ferrum-soak-"))
    server = bs.FerrumServer(args.ferrum_bin, args.gguf.resolve(), args.model, args.threads,
                             work, 300.0, args.ferrum_args.split())
    pid = server.proc.pid
    stop = time.monotonic() + args.minutes * 60
    lock = threading.Lock()
    done = {"ok": 0, "failed": 0, "tokens": 0}
    errors: list[str] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        with httpx.Client(timeout=600, trust_env=False) as client:
            i = 0
            while time.monotonic() < stop:
                words = " ".join(rng.choice(bs.TOPICS) for _ in range(rng.randint(3, 12)))
                messages = [{"role": "user", "content": f"({w}.{i}) Tell me about {words}."}]
                body = bs.chat_body(args.model, messages, args.max_tokens, [])
                r = bs.stream_chat(client, server, body)
                with lock:
                    if r.error:
                        done["failed"] += 1
                        errors.append(r.error)
                    else:
                        done["ok"] += 1
                        done["tokens"] += r.completion_tokens
                i += 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True)
               for w in range(args.concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples: list[tuple[float, float, dict[str, float], int]] = []
    print(f"soak: {args.model}, concurrency {args.concurrency}, {args.minutes:g} min, "
          f"server pid {pid}", flush=True)
    print(f"{'min':>6} {'RSS MiB':>9} {'KV used':>8} {'cached':>7} {'total':>6} "
          f"{'KV MiB':>7} {'requests':>9} {'tok/s':>7}", flush=True)
    with httpx.Client(timeout=30, trust_env=False) as client:
        last_tokens, last_t = 0, t0
        while True:
            now = time.monotonic()
            g = gauges(client, server.base_url)
            rss = rss_mib(pid)
            with lock:
                n = done["ok"]
            samples.append((now - t0, rss, g, n))
            tokens = g.get("ferrum_generated_tokens_total", 0)
            rate = (tokens - last_tokens) / max(now - last_t, 1e-9)
            last_tokens, last_t = tokens, now
            print(f"{(now - t0) / 60:>6.1f} {rss:>9.1f} {g.get('ferrum_kv_blocks_used', 0):>8.0f} "
                  f"{g.get('ferrum_kv_blocks_cached', 0):>7.0f} "
                  f"{g.get('ferrum_kv_blocks_total', 0):>6.0f} "
                  f"{g.get('ferrum_kv_cache_bytes', 0) / 2**20:>7.1f} {n:>9} {rate:>7.1f}",
                  flush=True)
            if now >= stop:
                break
            time.sleep(min(args.every, max(stop - time.monotonic(), 0.1)))
    for t in threads:
        t.join()
    server.stop()
    tail = [s for s in samples if s[0] >= samples[-1][0] * 0.75]
    first, last = tail[0][1], max(s[1] for s in tail)
    growth = (last - first) / first * 100
    print(f"requests: {done['ok']} ok, {done['failed']} failed; {done['tokens']} tokens")
    print(f"RSS over the last quarter: {first:.1f} -> at most {last:.1f} MiB ({growth:+.1f}%); "
          f"largest overall {max(s[1] for s in samples):.1f} MiB")
    for e in errors[:5]:
        print(f"error: {e}")
    ok = growth <= args.growth_pct and done["failed"] == 0
    print("PLATEAU" if ok else "NO PLATEAU / FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
