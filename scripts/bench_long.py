#!/usr/bin/env python3
"""Long-context checks through the API: needle in a haystack, and fairness during a long prefill.

Two subcommands, each against `ferrum serve` and (optionally) llama.cpp's `llama-server` on the
same GGUF with the same threads, one server after the other, never both at once:

`niah`: needle in a haystack. For each haystack length (tokens, e.g. 8000,16000,30000) one
haystack of varied filler sentences holds one fact per depth (10/50/90% by default): "The
passcode of the <name> archive is <6 digits>.", each with its own name and number. The model is
then asked for each passcode in turn (`temperature` 0, `max_tokens` 24, same haystack, the
question last): an answer is right when it contains the passcode's digits. The haystack is a
common prefix of the questions, so the first question of a length is read uncached (its time
is the time to read the whole prompt: reported as TTFT) and the others hit each server's prompt
cache. Several facts in one haystack (a "multi-key" needle test, as RULER's) cost one prefill per
length instead of one per depth; the distractors make it harder, for both servers alike.

`fairness`: `--streams` clients (4) decode streamed chat completions back to back (short
prompts, `max_tokens` 128, end-of-text tokens banned). Phase 1 measures their inter-token
latency (ITL: the gap between consecutive content chunks of a stream) for `--baseline-s`
seconds. Phase 2 sends one uncached `--long-tokens`-token prompt (16000) while they decode and
measures their ITL from the moment it is sent until its first token arrives. Reported: ITL
p50 / p99 / max of both phases, and the long prompt's time to first token.

Run with the venv that scripts/e2e.sh creates (it has httpx):

    target/e2e-venv/bin/python scripts/bench_long.py niah --model gpt-4.1-mini \\
        --ferrum-bin target/release/ferrum --llama-server /path/to/llama-server \\
        --lengths 8000,16000,30000
    target/e2e-venv/bin/python scripts/bench_long.py fairness --model gpt-4.1-mini \\
        --ferrum-bin target/release/ferrum

Percentiles are numpy's default (linear between closest ranks), as in bench_serve.py.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402

NAMES = ["Amber", "Cobalt", "Juniper", "Saffron", "Indigo", "Marble", "Thistle", "Quartz", "Willow"]


def start(kind: str, args, gguf: Path, tmp: Path, ctx: int) -> bs.Server:
    if kind == "ferrum":
        bs.log(f"starting {args.ferrum_bin} serve ({args.threads} threads) ...")
        return bs.FerrumServer(args.ferrum_bin, gguf, args.model, args.threads, tmp / "ferrum",
                               args.startup_timeout, shlex.split(args.ferrum_args))
    bs.log(f"starting {args.llama_server} (-t {args.threads} -np 1 -c {ctx}) ...")
    return bs.LlamaServer(args.llama_server, gguf, args.threads, 1, ctx, tmp / "llama",
                          args.startup_timeout, shlex.split(args.llama_args))


def chat(client: httpx.Client, server: bs.Server, model: str, messages: list[dict],
         max_tokens: int) -> tuple[str, dict, float]:
    """One non-streamed greedy chat completion: its text, usage and wall time."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    r = client.post(f"{server.base_url}/v1/chat/completions", json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        server.check_alive()
        raise bs.ServerError(f"{server.name}: HTTP {r.status_code}: {r.text[:500]}")
    obj = r.json()
    return obj["choices"][0]["message"].get("content") or "", obj.get("usage") or {}, dt


# ---------------------------------------------------------------------------------------------
# Needle in a haystack.

def filler(rng: random.Random, k: int) -> str:
    return (f"{rng.choice(bs.SUBJECTS)} {rng.choice(bs.VERBS)} {rng.choice(bs.OBJECTS)} "
            f"{rng.choice(bs.PLACES)} {rng.choice(bs.TIMES)} (entry {k + 1}).")


@dataclass
class Needle:
    depth: int
    name: str
    code: str


def haystack(length: int, n_sentences: int, depths: list[int]) -> tuple[str, list[Needle]]:
    rng = random.Random(f"ferrum-niah-{length}")
    sentences = [filler(rng, k) for k in range(n_sentences)]
    names = rng.sample(NAMES, len(depths))
    needles = []
    # Insert from the deepest so that earlier indices stay put.
    for depth, name in sorted(zip(depths, names), reverse=True):
        code = str(rng.randrange(100000, 1000000))
        at = round(n_sentences * depth / 100)
        sentences.insert(at, f"The passcode of the {name} archive is {code}.")
        needles.append(Needle(depth, name, code))
    needles.sort(key=lambda n: n.depth)
    return " ".join(sentences), needles


def niah_messages(text: str, question: str) -> list[dict]:
    return [
        {"role": "system", "content": "You answer questions about the archive log the user gives."},
        {"role": "user", "content":
         f"Archive log:\n{text}\n\nQuestion: {question} Answer with the number only."},
    ]


def question(n: Needle) -> str:
    return f"What is the passcode of the {n.name} archive?"


@dataclass
class NiahRow:
    length: int
    prompt_tokens: int
    ttft_s: float
    answers: list[tuple[Needle, str, bool]] = field(default_factory=list)


def calibrate(client, server, args) -> float:
    """Prompt tokens per filler sentence on this tokenizer."""
    counts = []
    for n in (50, 150):
        text, _ = haystack(0, n, [])
        _, usage, _ = chat(client, server, args.model, niah_messages(text, "Ready?"), 1)
        counts.append(usage["prompt_tokens"])
    return (counts[1] - counts[0]) / 100


def run_niah(server: bs.Server, args, sentences: dict[int, int] | None) -> tuple[list[NiahRow], dict[int, int]]:
    rows = []
    timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=60.0, pool=args.timeout)
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        if sentences is None:
            per = calibrate(client, server, args)
            bs.log(f"{server.name}: {per:.2f} tokens per filler sentence")
            # ~120 tokens of template, question and needles
            sentences = {L: max(10, round((L - 120) / per)) for L in args.lengths}
        for length in args.lengths:
            text, needles = haystack(length, sentences[length], args.depths)
            row = None
            for k, n in enumerate(needles):
                answer, usage, dt = chat(client, server, args.model,
                                         niah_messages(text, question(n)), 24)
                if row is None:
                    row = NiahRow(length, usage.get("prompt_tokens", 0), dt)
                ok = n.code in answer.replace(",", "").replace(" ", "")
                row.answers.append((n, answer.strip(), ok))
                bs.log(f"{server.name}: {length} tokens, depth {n.depth}%: "
                       f"{'right' if ok else 'WRONG'} ({answer.strip()[:60]!r}, "
                       f"{dt:.1f} s{', uncached' if k == 0 else ''})")
            rows.append(row)
    return rows, sentences


def niah(args, gguf: Path, tmp: Path) -> str:
    ctx = max(args.lengths) + 1024
    results: dict[str, list[NiahRow]] = {}
    sentences = None
    for kind in [k for k in ("ferrum", "llama") if getattr(args, f"{k}_server_ok")]:
        server = start(kind, args, gguf, tmp, ctx)
        try:
            results[server.name], sentences = run_niah(server, args, sentences)
        finally:
            server.stop()
    lines = [f"### Needle in a haystack, {args.model} ({gguf.name}), {args.threads} threads", ""]
    names = list(results)
    head = "| haystack | prompt tokens | " + " | ".join(
        f"{n}: {', '.join(f'{d}%' for d in args.depths)} | {n} TTFT" for n in names) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(names))]
    for i, length in enumerate(args.lengths):
        cells = [f"{length}", f"{results[names[0]][i].prompt_tokens}"]
        for n in names:
            row = results[n][i]
            cells.append(" ".join("✓" if ok else "✗" for _, _, ok in row.answers))
            cells.append(f"{row.ttft_s:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    for n in names:
        right = sum(ok for row in results[n] for _, _, ok in row.answers)
        total = sum(len(row.answers) for row in results[n])
        lines.append(f"\n{n}: {right}/{total} retrieved")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Fairness.

def decode_loops(client, server, args, stop: threading.Event, out: list[bs.Result], first: int):
    lock = threading.Lock()
    counter = iter(range(first, first + 100000))

    def worker():
        while not stop.is_set() and not bs._interrupted.is_set():
            with lock:
                i = next(counter)
            body = bs.chat_body(args.model, bs.load_prompt(i), args.max_tokens, args.ban)
            r = bs.stream_chat(client, server, body)
            if r.error:
                bs.log(f"{server.name}: stream failed: {r.error}")
                stop.set()
            with lock:
                out.append(r)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.streams)]
    for t in threads:
        t.start()
    return threads


def gaps_within(results: list[bs.Result], t0: float, t1: float) -> list[float]:
    gaps = []
    for r in results:
        t = r.chunk_times
        gaps += [b - a for a, b in zip(t, t[1:]) if a >= t0 and b <= t1]
    return gaps


def fairness(args, gguf: Path, tmp: Path) -> str:
    ctx = args.long_tokens + 2048
    out = [f"### Fairness: {args.streams} decoding streams while a {args.long_tokens}-token "
           f"prompt is read, {args.model} ({gguf.name}), {args.threads} threads", "",
           "| server | phase | ITL p50 | ITL p99 | ITL max | gaps | long prompt TTFT |",
           "|---|---|---|---|---|---|---|"]
    for kind in [k for k in ("ferrum", "llama") if getattr(args, f"{k}_server_ok")]:
        if kind == "ferrum":
            server = start(kind, args, gguf, tmp, ctx)
        else:  # one slot per stream plus the long prompt's
            server = bs.LlamaServer(args.llama_server, gguf, args.threads, args.streams + 1,
                                    ctx * (args.streams + 1), tmp / "llama",
                                    args.startup_timeout, shlex.split(args.llama_args))
        try:
            limits = httpx.Limits(max_connections=args.streams + 4)
            timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=60.0, pool=args.timeout)
            with httpx.Client(timeout=timeout, limits=limits, trust_env=False) as client:
                bs.stream_chat(client, server, bs.chat_body(args.model, bs.warmup_prompt(0), 8, args.ban))
                # Tokens per sentence of the long prompt, measured before anything decodes.
                sizes = []
                for k in (50, 150):
                    msgs = bs.prefix_messages(bs.make_prefix(f"calibrate-{k}", k), "Hi")
                    sizes.append(bs.stream_chat(client, server, bs.chat_body(
                        args.model, msgs, 1, args.ban)).prompt_tokens)
                n = max(1, round((args.long_tokens - 60) / ((sizes[1] - sizes[0]) / 100)))
                # Phase 1
                stop, res = threading.Event(), []
                threads = decode_loops(client, server, args, stop, res, 0)
                time.sleep(5)
                t0 = time.perf_counter()
                time.sleep(args.baseline_s)
                t1 = time.perf_counter()
                stop.set()
                for t in threads:
                    t.join()
                base = gaps_within(res, t0, t1)
                # Phase 2
                stop, res = threading.Event(), []
                threads = decode_loops(client, server, args, stop, res, 10000)
                time.sleep(5)
                long_msgs = bs.prefix_messages(bs.make_prefix("fairness", n),
                                               "Question: how many entries are there?")
                t0 = time.perf_counter()
                long = bs.stream_chat(client, server, bs.chat_body(args.model, long_msgs, 4, args.ban))
                t1 = long.t_first or time.perf_counter()
                stop.set()
                for t in threads:
                    t.join()
                if long.error:
                    raise bs.ServerError(f"{server.name}: long prompt failed: {long.error}")
                during = gaps_within(res, t0, t1)
        finally:
            server.stop()

        def row(phase, gaps, ttft):
            p = lambda q: bs.fmt_ms(bs.percentile(gaps, q))  # noqa: E731
            return (f"| {server.name} | {phase} | {p(50)} ms | {p(99)} ms | "
                    f"{bs.fmt_ms(max(gaps) if gaps else None)} ms | {len(gaps)} | {ttft} |")
        out.append(row("decoding only", base, "-"))
        out.append(row(f"during the {long.prompt_tokens}-token prompt", during,
                       f"{long.ttft:.1f} s"))
        bs.log("\n".join(out[-2:]))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("test", choices=["niah", "fairness"])
    ap.add_argument("--ferrum-bin", type=Path, help="the ferrum binary (`serve` is started)")
    ap.add_argument("--ferrum-args", default="", help="extra `ferrum serve` arguments, one string")
    ap.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    ap.add_argument("--llama-args", default="-fa on", help="extra llama-server arguments")
    ap.add_argument("--gguf", type=Path, help="the weights (default: `ferrum pull MODEL`)")
    ap.add_argument("--model", default="gpt-4.1-mini")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="8000,16000,30000", help="niah: haystack tokens")
    ap.add_argument("--depths", default="10,50,90", help="niah: fact depths, percent")
    ap.add_argument("--streams", type=int, default=4, help="fairness: decoding streams")
    ap.add_argument("--max-tokens", type=int, default=128, help="fairness: tokens per stream request")
    ap.add_argument("--long-tokens", type=int, default=16000, help="fairness: the long prompt")
    ap.add_argument("--baseline-s", type=float, default=60.0, help="fairness: phase 1 length")
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--markdown", type=Path, help="append the report to this file")
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [int(x) for x in args.depths.split(",")]
    args.ban = bs.DEFAULT_BAN.get(args.model, [])
    args.ferrum_server_ok = args.ferrum_bin is not None
    args.llama_server_ok = args.llama_server is not None
    if not (args.ferrum_server_ok or args.llama_server_ok):
        sys.exit("give --ferrum-bin and/or --llama-server")
    gguf = args.gguf or bs.default_gguf(args)
    tmp = Path(tempfile.mkdtemp(prefix="ferrum-bench-long-"))
    try:
        text = niah(args, gguf, tmp) if args.test == "niah" else fairness(args, gguf, tmp)
    except bs.ServerError as e:
        bs.log(f"error: {e}")
        return 1
    finally:
        bs._kill_all_children()
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
