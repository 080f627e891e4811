#!/usr/bin/env python3
"""Draft-model speculative decoding benchmark: gpt-4.1 with gpt-4.1-mini as its draft, against
gpt-4.1 alone, on the same weights in the same server.

The script writes a config with three tiers (local paths to the cached default weights):
`gpt-4.1` (no draft), `gpt-4.1-drafted` (the same weights, `draft = { tier = "gpt-4.1-mini",
tokens = K }`) and `gpt-4.1-mini`, starts `ferrum serve` on it, and for each task sends the same
greedy request to both, alternating which goes first, `--runs` times. It reports wall time,
completion tokens and tokens/s, the draft's kept and rejected proposals (from /metrics), checks
that both outputs are identical (a draft never changes the output), and quotes medians.

Tasks: writing new code (no text to copy), and the code edit of bench_predict.py without the
prediction (the answer repeats the prompt, which a draft also proposes well).

    target/e2e-venv/bin/python scripts/bench_draft.py --ferrum-bin target/release/ferrum \\
        --tokens 4 --runs 3

Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import start_server  # noqa: E402
from bench_predict import source_file  # noqa: E402

PRICE = "price = { input = 2.0, cached_input = 0.5, output = 8.0 }"


def models_dir() -> Path:
    home = os.environ.get("FERRUM_HOME") or str(Path.home() / ".cache" / "ferrum")
    return Path(home) / "models"


def config(tokens: int) -> str:
    full = models_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    mini = models_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    for f in (full, mini):
        if not f.is_file():
            sys.exit(f"{f} is missing: run `ferrum pull` first")
    return f"""
[[tier]]
id = "gpt-4.1"
weights = {{ path = "{full}" }}
{PRICE}

[[tier]]
id = "gpt-4.1-drafted"
weights = {{ path = "{full}" }}
draft = {{ tier = "gpt-4.1-mini", tokens = {tokens} }}
{PRICE}

[[tier]]
id = "gpt-4.1-mini"
weights = {{ path = "{mini}" }}
{PRICE}
"""


def tasks(lines: int) -> dict[str, list[dict]]:
    code = source_file(lines)
    return {
        "write code": [
            {"role": "user", "content": "Write a Python class for a binary search tree with insert, delete, "
             "search and an in-order traversal, with docstrings."},
        ],
        "edit code (no prediction)": [
            {"role": "system", "content": "You edit code. Reply with the whole edited file only, no explanations."},
            {"role": "user", "content": f"Rename the variable `total` to `running_sum` in this file:\n\n{code}"},
        ],
    }


def draft_counts(http: httpx.Client) -> tuple[int, int]:
    text = http.get("/metrics").text
    def value(name: str) -> int:
        m = re.search(rf'^{name}{{model="gpt-4.1-drafted"}} (\d+)', text, re.M)
        return int(m.group(1)) if m else 0
    return value("ferrum_draft_accepted_tokens_total"), value("ferrum_draft_rejected_tokens_total")


def ask(http: httpx.Client, model: str, messages: list[dict], max_tokens: int) -> dict:
    before = draft_counts(http)
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json=body)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    after = draft_counts(http)
    j = r.json()
    return {
        "wall": wall,
        "tokens": j["usage"]["completion_tokens"],
        "text": j["choices"][0]["message"]["content"],
        "kept": after[0] - before[0],
        "rejected": after[1] - before[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrum-bin", default="target/release/ferrum")
    ap.add_argument("--tokens", type=int, default=4, help="draft proposals per step")
    ap.add_argument("--lines", type=int, default=60, help="lines of the file to edit")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    extra = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "ferrum.toml"
        cfg.write_text(config(args.tokens))
        proc, base = start_server(args.ferrum_bin, Path(tmp), ["--config", str(cfg), *extra])
        try:
            with httpx.Client(base_url=base, timeout=3600) as http:
                for name, messages in tasks(args.lines).items():
                    # Both tiers read the prompt once first, so every timed request finds it in
                    # the prefix cache (the draft reads it each time: that cost is counted).
                    for model in ("gpt-4.1", "gpt-4.1-drafted"):
                        ask(http, model, messages, 1)
                    rows = []
                    for run in range(args.runs):
                        order = ["gpt-4.1", "gpt-4.1-drafted"]
                        if run % 2:
                            order.reverse()
                        got = {m: ask(http, m, messages, args.max_tokens) for m in order}
                        plain, drafted = got["gpt-4.1"], got["gpt-4.1-drafted"]
                        same = plain["text"] == drafted["text"]
                        rows.append((plain["wall"], drafted["wall"]))
                        proposed = drafted["kept"] + drafted["rejected"]
                        print(
                            f"{name} run {run + 1}: alone {plain['tokens']} tokens in {plain['wall']:.1f} s "
                            f"({plain['tokens'] / plain['wall']:.1f} tok/s); with the mini draft "
                            f"{drafted['tokens']} tokens in {drafted['wall']:.1f} s "
                            f"({drafted['tokens'] / drafted['wall']:.1f} tok/s), proposals kept "
                            f"{drafted['kept']}/{proposed}; speedup {plain['wall'] / drafted['wall']:.2f}x; "
                            f"identical output: {same}",
                            flush=True,
                        )
                        if not same:
                            sys.exit("outputs differ with and without the draft")
                    speedups = [a / b for a, b in rows]
                    print(f"{name} median (draft tokens {args.tokens}): alone "
                          f"{statistics.median(a for a, _ in rows):.1f} s, with the draft "
                          f"{statistics.median(b for _, b in rows):.1f} s, speedup "
                          f"{statistics.median(speedups):.2f}x", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
