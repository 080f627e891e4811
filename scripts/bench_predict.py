#!/usr/bin/env python3
"""Predicted outputs benchmark: a code edit (rename a variable in a ~150-line file) with and
without the file as `prediction`, per model.

The script starts `ferrum serve` itself (fresh database, embedded default configuration) and for
each model sends the same greedy request twice per run, without and with
`prediction: {"type": "content", "content": <the file>}`, and reports wall time, completion
tokens, decode tokens/s (completion tokens / wall time) and the usage's accepted and rejected
prediction tokens. It also checks that both outputs are identical (predictions never change the
output). Requests use `stream: false`; the prompt is the same both times, so the second request
of a pair reads it from the prefix cache: the order alternates between runs so neither side
always gets the cached prompt, and medians over runs are quoted.

    target/e2e-venv/bin/python scripts/bench_predict.py --ferrum-bin target/release/ferrum \\
        --models gpt-4.1-mini gpt-4.1 --runs 3

Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import start_server  # noqa: E402


def source_file(lines: int = 150) -> str:
    """A deterministic Python module of about `lines` lines that uses `total` throughout."""
    out = ['"""Inventory helpers."""', "", ""]
    i = 0
    while len(out) < lines:
        out += [
            f"def summarize_{i}(items):",
            f'    """Sum of the prices of group {i}."""',
            "    total = 0",
            "    for item in items:",
            f"        total += item.price * {i + 1}",
            "    return total",
            "",
        ]
        i += 1
    return "\n".join(out[:lines]) + "\n"


def ask(http: httpx.Client, model: str, code: str, prediction: bool, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You edit code. Reply with the whole edited file only, no explanations."},
            {"role": "user", "content": f"Rename the variable `total` to `running_sum` in this file:\n\n{code}"},
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if prediction:
        body["prediction"] = {"type": "content", "content": code}
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json=body)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    j = r.json()
    u = j["usage"]
    d = u["completion_tokens_details"]
    return {
        "wall": wall,
        "tokens": u["completion_tokens"],
        "accepted": d["accepted_prediction_tokens"],
        "rejected": d["rejected_prediction_tokens"],
        "text": j["choices"][0]["message"]["content"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferrum-bin", default="target/release/ferrum")
    ap.add_argument("--models", nargs="+", default=["gpt-4.1-mini", "gpt-4.1"])
    ap.add_argument("--lines", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    extra = ["--threads", str(args.threads)] if args.threads else []
    code = source_file(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args.ferrum_bin, Path(tmp), extra)
        try:
            with httpx.Client(base_url=base, timeout=3600) as http:
                for model in args.models:
                    rows = []
                    for run in range(args.runs):
                        order = [False, True] if run % 2 == 0 else [True, False]
                        got = {p: ask(http, model, code, p, args.max_tokens) for p in order}
                        plain, pred = got[False], got[True]
                        same = plain["text"] == pred["text"]
                        rows.append((plain["wall"], pred["wall"]))
                        print(
                            f"{model} run {run + 1}: without {plain['tokens']} tokens in {plain['wall']:.1f} s "
                            f"({plain['tokens'] / plain['wall']:.1f} tok/s); with prediction "
                            f"{pred['tokens']} tokens in {pred['wall']:.1f} s "
                            f"({pred['tokens'] / pred['wall']:.1f} tok/s), accepted {pred['accepted']}, "
                            f"rejected {pred['rejected']}; speedup {plain['wall'] / pred['wall']:.2f}x; "
                            f"identical output: {same}",
                            flush=True,
                        )
                        if not same:
                            sys.exit("outputs differ with and without the prediction")
                    speedups = [a / b for a, b in rows]
                    print(f"{model} median: without {statistics.median(a for a, _ in rows):.1f} s, with "
                          f"{statistics.median(b for _, b in rows):.1f} s, speedup "
                          f"{statistics.median(speedups):.2f}x", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
