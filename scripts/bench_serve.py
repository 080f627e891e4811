#!/usr/bin/env python3
"""Serving load benchmark: `ferrum serve` and llama.cpp's `llama-server`, same GGUF, same threads.

For each server, one after the other (never both at once), this script sends streamed chat
completions (`POST /v1/chat/completions`, `stream: true`, `stream_options.include_usage`) at
each concurrency level (closed loop: N clients, each sending its next request when the previous
one finished) and reports:

- aggregate output tokens/s: completion tokens of the level / wall time of the level (first
  request sent -> last response finished);
- TTFT p50 / p99: request sent -> first non-empty content chunk received;
- ITL p50 / p99: gaps between consecutive content chunks, pooled over the level's requests.

Percentiles use linear interpolation between closest ranks (numpy's default, "type 7").

Every request has a distinct prompt (the distinct words come first, so requests share no prefix
beyond the chat template's own header), `temperature` 0, `max_tokens` 128, and a `logit_bias`
of -100 on the model's end-of-generation tokens so that each one generates exactly `max_tokens`
tokens. Both servers get the same prompts and the same body.

`--prefix-tokens N` adds a prefix-cache test: request A (an N-token system message + question 1,
uncached), then request B (the same system message + question 2): TTFT(B) / TTFT(A) and B's
`usage.prompt_tokens_details.cached_tokens`. llama-server is measured the same way; its cache
is its per-slot prompt cache (`cache_prompt`, on by default).

Run it with the venv that scripts/e2e.sh creates (it has httpx):

    target/e2e-venv/bin/python scripts/bench_serve.py \\
        --ferrum-bin target/release/ferrum --llama-server /path/to/llama-server \\
        --threads 2 --prefix-tokens 2000 --markdown bench.md

Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import math
import os
import platform
import queue
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTEN_LINE = re.compile(r"^ferrum listening on (http://\S+)$")

# End-of-generation token ids per tier (banned with logit_bias -100 so that every request
# generates exactly max_tokens tokens).
DEFAULT_BAN = {
    "gpt-4.1-nano": [0, 2],  # SmolLM2: <|endoftext|>, <|im_end|>
    "gpt-4.1-mini": [151643, 151645],  # Qwen2.5: <|endoftext|>, <|im_end|>
    "gpt-4.1": [151643, 151645],
}

TOPICS = [
    "a lighthouse keeper", "a lost umbrella", "volcanic islands", "a chess prodigy",
    "the first snowfall", "an abandoned railway", "a beekeeper's diary", "deep-sea divers",
    "a broken clock tower", "desert caravans", "a robot gardener", "midnight bakeries",
    "glacier research", "a travelling circus", "an old violin", "cartographers at sea",
    "a village without mirrors", "comet hunters", "the last bookshop", "mountain rescue dogs",
    "a haunted observatory", "paper airplanes", "river ferries", "a forgotten language",
    "tea plantations", "a submarine cook", "wind farms", "street musicians in winter",
    "a clockmaker's apprentice", "polar night", "a runaway balloon", "coral reefs",
    "a night train to Vienna", "honey thieves", "a city of bridges", "stargazing shepherds",
    "an inventor's notebook", "salt marshes", "a quiet monastery", "kite festivals",
]
STYLES = [
    "short", "funny", "sad", "mysterious", "hopeful", "strange", "gentle", "dramatic",
    "poetic", "suspenseful", "whimsical", "bittersweet",
]

# Sentence parts of the prefix-cache test's system message (varied, so it is not a run of
# repeated tokens).
SUBJECTS = [
    "The harbour master", "A tired engineer", "The northern committee", "Our oldest client",
    "The night nurse", "A visiting botanist", "The river authority", "Every apprentice",
    "The museum's curator", "A careful accountant", "The weather station", "Two surveyors",
    "The school librarian", "A retired pilot", "The city council", "The bakery's owner",
]
VERBS = [
    "recorded", "questioned", "repaired", "catalogued", "inspected", "postponed", "approved",
    "measured", "described", "delivered", "rejected", "photographed", "translated", "counted",
]
OBJECTS = [
    "the copper valves", "seventeen wooden crates", "the spring inventory", "a damaged map",
    "the eastern bridge", "four unusual samples", "the quarterly budget", "an old telescope",
    "the flood barriers", "twelve signed letters", "the greenhouse heaters", "a silver compass",
    "the tram timetable", "the orchard fences", "nine glass jars", "the archive ledgers",
]
PLACES = [
    "near Lisbon", "in Oslo", "outside Nairobi", "in Montreal", "near Kyoto", "in Valparaiso",
    "outside Tbilisi", "in Reykjavik", "near Hobart", "in Marrakesh", "outside Krakow",
    "in Cartagena", "near Dundee", "in Ljubljana",
]
TIMES = [
    "on Monday morning", "before the storm", "after the long holiday", "during the night shift",
    "in early March", "at noon", "last autumn", "within an hour", "two days later",
    "at the end of the season", "before sunrise", "on a rainy Thursday",
]
PREFIX_QUESTIONS = (
    "Question: in one sentence, what did the harbour master record?",
    "Question: in one sentence, which cities are mentioned in the notes?",
)


# ---------------------------------------------------------------------------------------------
# Child processes: started in their own session, always killed on exit (also on Ctrl-C).

_children: list[subprocess.Popen] = []
_children_lock = threading.Lock()
_interrupted = threading.Event()  # set on Ctrl-C / SIGTERM: workers stop, children are killed


def _register(proc: subprocess.Popen) -> None:
    with _children_lock:
        _children.append(proc)


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            if _interrupted.is_set():
                proc.kill()  # no graceful shutdown: it would wait for the streams in flight
            else:
                proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    with _children_lock:
        if proc in _children:
            _children.remove(proc)


def _kill_all_children() -> None:
    with _children_lock:
        procs = list(_children)
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_all_children)


def _on_sigterm(signum, frame):  # noqa: ARG001
    _interrupted.set()
    raise KeyboardInterrupt(f"signal {signum}")


def _tail(path: Path, head: int = 1500, tail: int = 2500) -> str:
    """The start and the end of a log (an error's message may come before a long backtrace)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters ...]\n{text[-tail:]}"


class ServerError(RuntimeError):
    pass


class Server:
    """A server under test: its name, base URL, how to authenticate, and (when this script
    started it) its process and log."""

    name: str
    base_url: str = "(not listening yet)"
    api_key: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    command: list[str] | None = None

    def describe(self) -> str:
        out = f"{self.name} at {self.base_url}"
        if self.command:
            out += f"\ncommand: {shlex.join(self.command)}"
        if self.log_path:
            out += f"\nlog ({self.log_path}):\n{_tail(self.log_path)}"
        return out

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"{self.name} exited with {self.proc.returncode}\n{self.describe()}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class FerrumServer(Server):
    def __init__(self, binary: Path, gguf: Path, model: str, threads: int, workdir: Path,
                 startup_timeout: float, extra_args: list[str], config_text: str | None = None):
        """Serves `gguf` as the one tier `model`, or the tiers of `config_text` when given."""
        self.name = "ferrum"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "ferrum.toml"
        config.write_text(config_text or (
            "[[tier]]\n"
            f"id = {json.dumps(model)}\n"
            "price = { input = 0.1, cached_input = 0.025, output = 0.4 }\n"
            f"weights = {{ path = {json.dumps(str(gguf))} }}\n"
        ))
        self.log_path = workdir / "ferrum.stderr.log"
        self.command = [
            str(binary), "serve",
            "--config", str(config),
            "--addr", "127.0.0.1:0",
            "--database", f"sqlite://{workdir / 'b.db'}",
            "--threads", str(threads),
            *extra_args,
        ]
        log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                text=True, start_new_session=True,
            )
        except OSError as e:
            raise ServerError(f"cannot start {binary}: {e}") from e
        finally:
            log.close()
        _register(self.proc)
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise ServerError(
                    f"ferrum printed no 'ferrum listening on' line within {startup_timeout:.0f} s"
                    f"\n{self.describe()}")
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=10)
                raise ServerError(
                    f"ferrum serve exited with {self.proc.returncode} before listening\n"
                    f"{self.describe()}")
            m = LISTEN_LINE.match(line.strip())
            if m:
                self.base_url = m.group(1)
                return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer(Server):
    def __init__(self, binary: Path, gguf: Path, threads: int, n_parallel: int, ctx: int,
                 workdir: Path, startup_timeout: float, extra_args: list[str]):
        self.name = "llama-server"
        workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "llama-server.log"
        self.command = [
            str(binary), "-m", str(gguf),
            "-t", str(threads), "-tb", str(threads),
            "-np", str(n_parallel), "-c", str(ctx), "--cont-batching",
            "--host", "127.0.0.1", "--port", str(port),
            *extra_args,
        ]
        log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise ServerError(f"cannot start {binary}: {e}") from e
        finally:
            log.close()
        _register(self.proc)
        deadline = time.monotonic() + startup_timeout
        with httpx.Client(timeout=5, trust_env=False) as c:
            while True:
                self.check_alive()
                try:
                    if c.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(
                        f"llama-server's /health did not return 200 within "
                        f"{startup_timeout:.0f} s\n{self.describe()}")
                time.sleep(0.25)


class ExternalServer(Server):
    def __init__(self, name: str, url: str, api_key: str | None):
        self.name = name
        self.base_url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key


# ---------------------------------------------------------------------------------------------
# One streamed request.

@dataclass
class Result:
    t_start: float = 0.0  # perf_counter when the request was sent
    t_end: float = 0.0  # when the stream ended (or failed)
    t_first: float | None = None  # first non-empty content chunk
    chunk_times: list[float] = field(default_factory=list)  # every non-empty content chunk
    usage: dict | None = None
    server_timings: dict | None = None  # llama-server's own `timings` (final chunk)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return len(self.chunk_times)

    @property
    def prompt_tokens(self) -> int | None:
        return self.usage.get("prompt_tokens") if self.usage else None

    @property
    def cached_tokens(self) -> int | None:
        if not self.usage:
            return None
        details = self.usage.get("prompt_tokens_details") or {}
        return details.get("cached_tokens")


def stream_chat(client: httpx.Client, server: Server, body: dict) -> Result:
    r = Result()
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    done = False
    r.t_start = time.perf_counter()
    try:
        with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                           headers=headers) as resp:
            if resp.status_code != 200:
                text = resp.read().decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {text[:300]}"
                return r
            for line in resp.iter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (keep-alives), event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    r.error = f"bad SSE data: {data[:200]}"
                    break
                if "error" in obj:
                    r.error = f"error event: {json.dumps(obj['error'])[:300]}"
                    break
                if obj.get("usage"):
                    r.usage = obj["usage"]
                if isinstance(obj.get("timings"), dict):
                    r.server_timings = obj["timings"]
                for choice in obj.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if r.t_first is None:
                            r.t_first = now
                        r.chunk_times.append(now)
                    if choice.get("finish_reason"):
                        r.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, RuntimeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.t_end = time.perf_counter()
    if r.error is None and not done:
        r.error = "stream ended without [DONE]"
    if r.error is None and r.t_first is None:
        r.error = "no content in the stream"
    return r


def chat_body(model: str, messages: list[dict], max_tokens: int, ban: list[int]) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ban:
        body["logit_bias"] = {str(t): -100 for t in ban}
    return body


def load_prompt(i: int) -> list[dict]:
    """Request i's prompt: distinct words first, so no two requests share a prefix beyond the
    chat template's header."""
    topic = TOPICS[i % len(TOPICS)]
    style = STYLES[(i // len(TOPICS)) % len(STYLES)]
    return [{"role": "user", "content":
             f"{topic[0].upper()}{topic[1:]} (request {i}): write a {style} story about {topic}."}]


def warmup_prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Warm-up {i}: say something about {TOPICS[-1 - i % 40]}."}]


# ---------------------------------------------------------------------------------------------
# Statistics.

def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


@dataclass
class Level:
    concurrency: int
    results: list[Result]
    wall_s: float

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]

    @property
    def output_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, p: float) -> float | None:
        return percentile([r.ttft for r in self.ok if r.ttft is not None], p)

    def itl(self, p: float) -> float | None:
        return percentile([x for r in self.ok for x in r.itls], p)

    @property
    def usage_reported(self) -> bool:
        return all(r.usage and "completion_tokens" in r.usage for r in self.ok)


def run_level(client: httpx.Client, server: Server, concurrency: int, n_requests: int,
              first_index: int, args, ban: list[int]) -> Level:
    results: list[Result | None] = [None] * n_requests
    next_i = iter(range(n_requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None or _interrupted.is_set():
                return
            body = chat_body(args.model, load_prompt(first_index + i), args.max_tokens, ban)
            results[i] = stream_chat(client, server, body)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # join in slices so that Ctrl-C is handled promptly
                t.join(0.5)
    except KeyboardInterrupt:
        _interrupted.set()
        raise
    done = [r for r in results if r is not None]
    wall = max((r.t_end for r in done), default=t0) - t0
    return Level(concurrency, done, wall)


# ---------------------------------------------------------------------------------------------
# Prefix-cache test.

def make_prefix(seed: str, n_sentences: int) -> str:
    rng = random.Random(f"ferrum-bench-prefix-{seed}")
    code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(8))
    parts = [f"Field notes {code}. Read them carefully; questions follow."]
    for k in range(n_sentences):
        parts.append(
            f"{k + 1}. {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(PLACES)} {rng.choice(TIMES)}.")
    return " ".join(parts)


def prefix_messages(prefix: str, question: str) -> list[dict]:
    return [{"role": "system", "content": prefix}, {"role": "user", "content": question}]


@dataclass
class PrefixPair:
    a: Result
    b: Result

    @property
    def ratio(self) -> float | None:
        if self.a.ttft and self.b.ttft is not None:
            return self.b.ttft / self.a.ttft
        return None


@dataclass
class PrefixReport:
    target_tokens: int
    n_sentences: int
    pairs: list[PrefixPair]

    @property
    def median_ratio(self) -> float | None:
        rs = [p.ratio for p in self.pairs if p.ratio is not None]
        return statistics.median(rs) if rs else None


def prefix_test(client: httpx.Client, server: Server, args, ban: list[int]) -> PrefixReport:
    def one(messages: list[dict], max_tokens: int) -> Result:
        r = stream_chat(client, server, chat_body(args.model, messages, max_tokens, ban))
        if r.error:
            server.check_alive()
            raise ServerError(f"{server.name}: prefix-cache test request failed: {r.error}\n"
                              f"{server.describe()}")
        if r.prompt_tokens is None:
            raise ServerError(f"{server.name}: no usage.prompt_tokens in the stream")
        return r

    # Calibrate tokens per sentence with throw-away prefixes (other seeds than the test's, so
    # that request A of the test is not a cache hit).
    k = 20
    p1 = one(prefix_messages(make_prefix("calibrate-1", k), PREFIX_QUESTIONS[0]), 1).prompt_tokens
    p2 = one(prefix_messages(make_prefix("calibrate-2", 2 * k), PREFIX_QUESTIONS[0]), 1).prompt_tokens
    per_sentence = max((p2 - p1) / k, 1.0)
    n = max(1, round(args.prefix_tokens / per_sentence))
    pairs = []
    for rep in range(args.prefix_repeats):
        prefix = make_prefix(f"test-{rep}", n)
        a = one(prefix_messages(prefix, PREFIX_QUESTIONS[0]), args.prefix_max_tokens)
        b = one(prefix_messages(prefix, PREFIX_QUESTIONS[1]), args.prefix_max_tokens)
        pairs.append(PrefixPair(a, b))
    return PrefixReport(args.prefix_tokens, n, pairs)


# ---------------------------------------------------------------------------------------------
# Driving one server.

@dataclass
class ServerRun:
    name: str
    command: str | None
    levels: list[Level]
    prefix: PrefixReport | None
    version: str | None = None


def bench_server(server: Server, args, ban: list[int]) -> ServerRun:
    max_c = max(args.concurrency)
    limits = httpx.Limits(max_connections=max_c + 4, max_keepalive_connections=max_c + 4)
    timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=30.0, pool=args.timeout)
    levels = []
    prefix = None
    with httpx.Client(timeout=timeout, limits=limits, trust_env=False) as client:
        for i in range(args.warmup):
            r = stream_chat(client, server,
                            chat_body(args.model, warmup_prompt(i), min(args.max_tokens, 16), ban))
            if r.error:
                server.check_alive()
                raise ServerError(f"{server.name}: warm-up request failed: {r.error}\n"
                                  f"{server.describe()}")
        first_index = 0
        for c in args.concurrency:
            n = args.requests_per_level or max(2 * c, 4)
            log(f"{server.name}: concurrency {c}, {n} requests ...")
            level = run_level(client, server, c, n, first_index, args, ban)
            first_index += n
            levels.append(level)
            log(f"  {level.tok_s:.1f} output tok/s, TTFT p50 {fmt_ms(level.ttft(50))} ms, "
                f"ITL p50 {fmt_ms(level.itl(50))} ms, {len(level.errors)} errors "
                f"({level.wall_s:.1f} s)")
            for r in level.errors[:3]:
                log(f"  error: {r.error}")
            if level.errors:
                server.check_alive()
        if args.prefix_tokens > 0:
            log(f"{server.name}: prefix-cache test, ~{args.prefix_tokens}-token prefix ...")
            prefix = prefix_test(client, server, args, ban)
    return ServerRun(server.name, shlex.join(server.command) if server.command else None,
                     levels, prefix)


# ---------------------------------------------------------------------------------------------
# Report.

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def llama_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.removeprefix("version:").strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown version"


def server_table(run: ServerRun, max_tokens: int) -> list[str]:
    lines = [
        f"##### {run.name}" + (f" ({run.version})" if run.version else ""),
        "",
    ]
    if run.command:
        lines += [f"`{run.command}`", ""]
    lines += [
        "| concurrency | requests | errors | wall s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for lv in run.levels:
        lines.append(
            f"| {lv.concurrency} | {len(lv.results)} | {len(lv.errors)} | {lv.wall_s:.1f} | "
            f"{lv.tok_s:.1f} | {fmt_ms(lv.ttft(50))} / {fmt_ms(lv.ttft(99))} | "
            f"{fmt_ms(lv.itl(50))} / {fmt_ms(lv.itl(99))} |")
        ok = lv.ok
        if ok:
            toks = [r.completion_tokens for r in ok]
            short = sum(1 for t in toks if t < max_tokens)
            prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
            chunks = [len(r.chunk_times) for r in ok]
            note = (f"c={lv.concurrency}: completion tokens per request {min(toks)}..{max(toks)}"
                    f" ({'from usage' if lv.usage_reported else 'counted as content chunks: no usage in the stream'})"
                    f", content chunks per request {min(chunks)}..{max(chunks)}")
            if prompts:
                note += f", prompt tokens {min(prompts)}..{max(prompts)}"
            per_tok = [r.server_timings.get("predicted_per_token_ms") for r in ok
                       if r.server_timings and r.server_timings.get("predicted_per_token_ms")]
            if per_tok:
                note += (f"; server-reported decode ms/token p50 "
                         f"{percentile(per_tok, 50):.1f}")
            if short:
                note += f"; {short} request(s) generated fewer than {max_tokens} tokens"
            notes.append(note)
        for r in lv.errors[:3]:
            notes.append(f"c={lv.concurrency} error: {r.error}")
    lines += [""] + [f"- {n}" for n in notes] + [""]
    return lines


def prefix_lines(run: ServerRun) -> list[str]:
    p = run.prefix
    if p is None:
        return []
    label = run.name
    if run.name == "llama-server":
        label += " (its per-slot prompt cache, `cache_prompt` on by default)"
    lines = [
        f"##### Prefix cache: {label}",
        "",
        f"System message of {p.n_sentences} varied sentences (target ~{p.target_tokens} tokens); "
        "A = prefix + question 1 (uncached), B = same prefix + question 2, sent after A finished.",
        "",
        "| pair | A prompt tokens | A cached | A TTFT ms | B prompt tokens | B cached | B TTFT ms | B / A |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, pair in enumerate(p.pairs):
        a, b = pair.a, pair.b
        ratio = "-" if pair.ratio is None else f"{pair.ratio:.3f}"
        lines.append(
            f"| {i + 1} | {a.prompt_tokens} | {a.cached_tokens} | {fmt_ms(a.ttft)} | "
            f"{b.prompt_tokens} | {b.cached_tokens} | {fmt_ms(b.ttft)} | {ratio} |")
    med = p.median_ratio
    lines += ["", f"Median TTFT(B) / TTFT(A): {'-' if med is None else f'{med:.3f}'}", ""]
    return lines


def ratio_lines(ferrum: ServerRun, llama: ServerRun) -> list[str]:
    lines = [
        "##### ferrum / llama-server",
        "",
        "| concurrency | output tok/s | TTFT p50 |",
        "|---:|---:|---:|",
    ]
    lb = {lv.concurrency: lv for lv in llama.levels}

    def r(x, y):
        return "-" if x is None or not y else f"{x / y:.2f}x"

    for lv in ferrum.levels:
        other = lb.get(lv.concurrency)
        if other is None:
            continue
        lines.append(f"| {lv.concurrency} | {r(lv.tok_s, other.tok_s)} | "
                     f"{r(lv.ttft(50), other.ttft(50))} |")
    lines.append("")
    return lines


def targets_lines(ferrum: ServerRun | None, llama: ServerRun | None) -> list[str]:
    lines = []
    if ferrum and llama:
        f8 = next((lv for lv in ferrum.levels if lv.concurrency == 8), None)
        l8 = next((lv for lv in llama.levels if lv.concurrency == 8), None)
        if f8 and l8 and l8.tok_s > 0:
            x = f8.tok_s / l8.tok_s
            lines.append(f"- aggregate output tok/s at concurrency 8 >= 1.2x llama-server's: "
                         f"{x:.2f}x ({'met' if x >= 1.2 else 'NOT met'})")
    if ferrum and ferrum.prefix and ferrum.prefix.median_ratio is not None:
        x = ferrum.prefix.median_ratio
        lines.append(f"- TTFT with the ~{ferrum.prefix.target_tokens}-token prefix cached <= 20% "
                     f"of uncached: {x * 100:.1f}% ({'met' if x <= 0.2 else 'NOT met'})")
    if lines:
        lines = ["##### Targets", ""] + lines + [""]
    return lines


def report(args, runs: list[ServerRun], gguf: Path | None, started: str, load0) -> str:
    lines = [
        f"#### Serving load run, {started}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; load average at start "
        f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1 / 5 / 15 min)",
        f"- model: `{args.model}`, GGUF `{gguf}`" if gguf else f"- model: `{args.model}`",
        f"- threads {args.threads}; max_tokens {args.max_tokens}, temperature 0, end-of-generation "
        f"tokens {args.ban or 'none'} banned (logit_bias -100); distinct prompt per request; "
        f"closed loop, {args.requests_per_level or 'max(2 x concurrency, 4)'} requests per level; "
        f"{args.warmup} warm-up request(s)",
        f"- ferrum commit {git_commit()}",
        "- percentiles: linear interpolation between closest ranks; ITL pooled over the level's "
        "requests (gaps between content chunks); output tok/s = completion tokens / level wall time",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        "",
    ]
    by_name = {r.name: r for r in runs}
    for run in runs:
        lines += server_table(run, args.max_tokens)
    if "ferrum" in by_name and "llama-server" in by_name:
        lines += ratio_lines(by_name["ferrum"], by_name["llama-server"])
    for run in runs:
        lines += prefix_lines(run)
    lines += targets_lines(by_name.get("ferrum"), by_name.get("llama-server"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main.

def default_gguf(args) -> Path:
    candidates = [args.ferrum_bin] if args.ferrum_bin else []
    candidates += [REPO_ROOT / "target/release/ferrum", REPO_ROOT / "target/debug/ferrum"]
    binary = next((c for c in candidates if c and Path(c).exists()), None)
    if binary is None:
        sys.exit("--gguf not given and no ferrum binary to run `ferrum pull` with")
    out = subprocess.run([str(binary), "pull", args.model], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"`{binary} pull {args.model}` failed:\n{out.stderr[-2000:]}")
    for line in out.stdout.splitlines():
        name, sep, path = line.partition(": ")
        if sep and name.strip() == args.model:
            return Path(path.strip())
    sys.exit(f"cannot find the weights path in `{binary} pull {args.model}`'s output:\n{out.stdout}")


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f = ap.add_mutually_exclusive_group()
    f.add_argument("--ferrum-bin", type=Path,
                   help="start `PATH serve` on a temporary config with one tier (--model) on --gguf")
    f.add_argument("--ferrum-url", help="an already running ferrum server (e.g. http://127.0.0.1:8080)")
    ap.add_argument("--api-key", help="API key of the --ferrum-url server")
    ap.add_argument("--llama-server", type=Path, help="path of llama.cpp's llama-server binary")
    ap.add_argument("--llama-np", type=int, default=16, help="llama-server slots (-np)")
    ap.add_argument("--llama-ctx", type=int, default=0,
                    help="llama-server total context (-c); 0: llama-np x per-slot context, the "
                         "per-slot context being 1024, or enough for the prefix-cache test")
    ap.add_argument("--llama-args", default="", help="extra llama-server arguments, one string: --llama-args='-fa on'")
    ap.add_argument("--ferrum-args", default="", help="extra `ferrum serve` arguments, one string: --ferrum-args='--queue-size 128'")
    ap.add_argument("--gguf", type=Path,
                    help="the model file (default: the path `ferrum pull MODEL` prints)")
    ap.add_argument("--model", default="gpt-4.1-nano", help="model id sent in requests")
    ap.add_argument("--threads", type=int, default=2, help="threads of both servers")
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    ap.add_argument("--requests-per-level", type=int, default=0,
                    help="requests per level (0: 2 x concurrency, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ban-tokens", default=None,
                    help="comma-separated token ids given logit_bias -100 (end of generation), "
                         "or 'none' (default: by --model: nano 0,2; mini and gpt-4.1 151643,151645)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up requests per server")
    ap.add_argument("--prefix-tokens", type=int, default=0,
                    help="prefix-cache test with a shared prefix of about this many tokens (0: skip)")
    ap.add_argument("--prefix-repeats", type=int, default=3,
                    help="A/B pairs of the prefix-cache test (fresh prefix each); the median ratio is reported")
    ap.add_argument("--prefix-max-tokens", type=int, default=8,
                    help="max_tokens of the prefix-cache test's requests")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a request may wait for its next bytes")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--markdown", type=Path, help="append the report to this file")
    ap.add_argument("--json", type=Path, help="write per-request raw timings to this file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error("--concurrency takes comma-separated integers")
    if not args.concurrency or min(args.concurrency) < 1:
        ap.error("--concurrency levels must be >= 1")
    if not (args.ferrum_bin or args.ferrum_url or args.llama_server):
        ap.error("nothing to measure: give --ferrum-bin or --ferrum-url, and/or --llama-server")
    if args.ban_tokens is None:
        if args.model not in DEFAULT_BAN:
            ap.error(f"no default end-of-generation ids for {args.model!r}: pass --ban-tokens")
        args.ban = DEFAULT_BAN[args.model]
    elif args.ban_tokens.strip().lower() in ("", "none"):
        args.ban = []
    else:
        try:
            args.ban = [int(x) for x in args.ban_tokens.split(",") if x.strip()]
        except ValueError:
            ap.error("--ban-tokens takes comma-separated token ids")
    return args


def raw_json(runs: list[ServerRun]) -> dict:
    def res(r: Result) -> dict:
        return {
            "ttft_s": r.ttft, "itl_s": r.itls, "completion_tokens": r.completion_tokens,
            "usage": r.usage, "server_timings": r.server_timings, "finish_reason": r.finish_reason, "error": r.error,
            "duration_s": r.t_end - r.t_start,
        }

    out = {}
    for run in runs:
        out[run.name] = {
            "command": run.command,
            "levels": [{"concurrency": lv.concurrency, "wall_s": lv.wall_s,
                        "output_tok_s": lv.tok_s, "requests": [res(r) for r in lv.results]}
                       for lv in run.levels],
            "prefix": None if run.prefix is None else {
                "n_sentences": run.prefix.n_sentences,
                "pairs": [{"a": res(p.a), "b": res(p.b)} for p in run.prefix.pairs],
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigterm)
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()
    if load0[0] > 0.5:
        log(f"warning: load average {load0[0]:.2f}: the machine is not quiet; figures will be noisy")
    gguf = args.gguf
    if gguf is None and (args.ferrum_bin or args.llama_server):
        gguf = default_gguf(args)
    if gguf is not None:
        gguf = gguf.resolve()
        if not gguf.is_file():
            sys.exit(f"no such GGUF file: {gguf}")
    tmp = Path(tempfile.mkdtemp(prefix="ferrum-bench-serve-"))
    runs: list[ServerRun] = []
    try:
        # ferrum first, then llama-server: never both at once.
        if args.ferrum_bin or args.ferrum_url:
            if args.ferrum_bin:
                log(f"starting {args.ferrum_bin} serve ({args.threads} threads) on {gguf} ...")
                server: Server = FerrumServer(args.ferrum_bin, gguf, args.model, args.threads,
                                              tmp / "ferrum", args.startup_timeout,
                                              shlex.split(args.ferrum_args))
            else:
                server = ExternalServer("ferrum", args.ferrum_url, args.api_key)
            try:
                runs.append(bench_server(server, args, args.ban))
            finally:
                server.stop()
        if args.llama_server:
            ctx = args.llama_ctx
            if ctx <= 0:
                per_slot = 1024
                if args.prefix_tokens > 0:
                    # room for the prefix (the calibration may overshoot it a little), the
                    # template and the question, and the answer.
                    need = int(args.prefix_tokens * 1.15) + 256 + args.prefix_max_tokens
                    per_slot = max(per_slot, -(-need // 256) * 256)
                ctx = args.llama_np * per_slot
            log(f"starting {args.llama_server} (-t {args.threads} -np {args.llama_np} -c {ctx}) ...")
            server = LlamaServer(args.llama_server, gguf, args.threads, args.llama_np, ctx,
                                 tmp / "llama", args.startup_timeout,
                                 shlex.split(args.llama_args))
            try:
                run = bench_server(server, args, args.ban)
                run.version = f"llama.cpp {llama_version(args.llama_server)}"
                runs.append(run)
            finally:
                server.stop()
    except ServerError as e:
        log(f"error: {e}")
        if runs:
            print(report(args, runs, gguf, started, load0))
        return 1
    except KeyboardInterrupt:
        _interrupted.set()
        log("interrupted")
        _kill_all_children()
        return 130
    finally:
        _kill_all_children()
        if args.keep_tmp:
            log(f"logs kept in {tmp}")
        else:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, runs, gguf, started, load0)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + text + "\n")
        log(f"appended to {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(raw_json(runs), indent=1))
        log(f"wrote {args.json}")
    errors = sum(len(lv.errors) for run in runs for lv in run.levels)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
