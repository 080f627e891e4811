"""Fixtures for the end-to-end tests: real `ferrum serve` processes driven over HTTP.

The binary is $FERRUM_BIN (default: target/debug/ferrum); the nano weights are the path that
`ferrum pull gpt-4.1-nano` prints (or $FERRUM_NANO_WEIGHTS). Each server gets its own ferrum.toml
and SQLite database in a temporary directory, so usage totals start empty.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import openai
import pytest

import spec_check
from helpers import NANO

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTEN_LINE = re.compile(r"^ferrum listening on http://127\.0\.0\.1:(\d+)$")
STARTUP_TIMEOUT_S = 120
HTTP_TIMEOUT_S = 120

CONFIG_TEMPLATE = """\
[[tier]]
id = "gpt-4.1-nano"
aliases = ["gpt-4.1-nano-2025-04-14"]
price = {{ input = 0.10, cached_input = 0.025, output = 0.40 }}
weights = {{ path = "{weights}" }}

[[tier]]
id = "gpt-4.1-mini"
aliases = ["gpt-4.1-mini-2025-04-14"]
load = "lazy"
price = {{ input = 0.40, cached_input = 0.10, output = 1.60 }}
weights = {{ path = "{weights}" }}
"""


class FerrumServer:
    """One `ferrum serve` child process on an ephemeral port of 127.0.0.1."""

    def __init__(
        self,
        binary: Path,
        config: Path | None,
        workdir: Path,
        args: list[str],
        *,
        database_url: str | None = None,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        # The workdir's own SQLite file unless a database URL (e.g. a shared Postgres) is given.
        self.database_url = database_url or f"sqlite://{workdir / 'ferrum.db'}"
        self.command = [
            str(binary), "serve",
            *(["--config", str(config)] if config is not None else []),
            "--addr", "127.0.0.1:0",
            "--database", self.database_url,
            *args,
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,  # a Ctrl-C of pytest does not reach the server directly
        )
        self.stdout_lines: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()
        self._stdout_thread = threading.Thread(target=self._drain_stdout, args=(lines,), daemon=True)
        self._stdout_thread.start()
        self.port = self._wait_for_listening(lines)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_base = f"{self.base_url}/v1"

    def _drain_stdout(self, lines: queue.Queue) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout_lines.append(line)
            lines.put(line)
        lines.put(None)

    def _wait_for_listening(self, lines: queue.Queue) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RuntimeError(
                    f"no 'ferrum listening on' line within {STARTUP_TIMEOUT_S} s\n{self.describe()}"
                )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait(timeout=10)
                raise RuntimeError(
                    f"ferrum serve exited with {self.process.returncode} before listening\n"
                    f"{self.describe()}"
                )
            match = LISTEN_LINE.match(line.rstrip("\n"))
            assert match, (
                f"the first stdout line must be 'ferrum listening on http://127.0.0.1:PORT', "
                f"got {line!r}\n{self.describe()}"
            )
            return int(match.group(1))

    def all_stdout(self, timeout: float = 10) -> list[str]:
        """Every line the server printed to stdout; call after it exited."""
        self._stdout_thread.join(timeout)
        return list(self.stdout_lines)

    def client(self, api_key: str = "sk-anything", **kwargs) -> openai.OpenAI:
        """An OpenAI SDK client for this server (no retries, so errors surface as they are)."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        # Every 2xx body is checked against the spec (spec_check.py).
        kwargs.setdefault("http_client", openai.DefaultHttpxClient(event_hooks=spec_check.HOOKS))
        return openai.OpenAI(base_url=self.api_base, api_key=api_key, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        """A raw HTTP client whose base URL is the server root (paths start with /v1 or /admin)."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        kwargs.setdefault("event_hooks", spec_check.HOOKS)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def describe(self) -> str:
        return f"command: {' '.join(self.command)}\nstderr tail:\n{self.log_tail()}"

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` s; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def ferrum_bin() -> Path:
    binary = Path(os.environ.get("FERRUM_BIN", REPO_ROOT / "target" / "debug" / "ferrum"))
    if not binary.is_file():
        pytest.fail(f"ferrum binary not found at {binary} (build it: cargo build -p ferrum)")
    probe = subprocess.run(
        [str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.fail(f"{binary} has no working `serve` command:\n{probe.stderr[-2000:]}")
    return binary


@pytest.fixture(scope="session")
def nano_weights(ferrum_bin: Path) -> Path:
    """The local GGUF of gpt-4.1-nano (SmolLM2-135M-Instruct), fetched by `ferrum pull`."""
    if "FERRUM_NANO_WEIGHTS" in os.environ:
        path = Path(os.environ["FERRUM_NANO_WEIGHTS"])
    else:
        pull = subprocess.run(
            [str(ferrum_bin), "pull", NANO], capture_output=True, text=True, timeout=1800
        )
        assert pull.returncode == 0, f"ferrum pull {NANO} failed:\n{pull.stderr[-2000:]}"
        found = [
            line.split(": ", 1)[1].strip()
            for line in pull.stdout.splitlines()
            if line.startswith(f"{NANO}: ")
        ]
        assert found, f"no '{NANO}: PATH' line in the output of ferrum pull: {pull.stdout!r}"
        path = Path(found[0])
    assert path.is_absolute() and path.is_file(), f"nano weights not found at {path}"
    return path


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory, nano_weights: Path) -> Path:
    """The test ferrum.toml: nano (loaded at startup) and mini (lazy), both on the nano weights."""
    path = tmp_path_factory.mktemp("config") / "ferrum.toml"
    path.write_text(CONFIG_TEMPLATE.format(weights=nano_weights))
    return path


@pytest.fixture(scope="session")
def server_factory(
    ferrum_bin: Path, config_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., FerrumServer]]:
    """Starts servers (`factory(*extra_args)`), each with a fresh database; stops them all at
    the end of the session unless a test stopped them first."""
    started: list[FerrumServer] = []

    def start(*args: str) -> FerrumServer:
        server = FerrumServer(ferrum_bin, config_file, tmp_path_factory.mktemp("server"), list(args))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiers_server(ferrum_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerrumServer]:
    """A server on the embedded default configuration: gpt-4.1, gpt-4.1-mini and gpt-4.1-nano on
    their real weights (which `scripts/test.sh` pulls first)."""
    server = FerrumServer(ferrum_bin, None, tmp_path_factory.mktemp("tiers"), [])
    yield server
    server.stop()


@pytest.fixture
def fresh_server(server_factory) -> Iterator[FerrumServer]:
    """A server of its own for one test (fresh database, lazy tiers not yet loaded)."""
    server = server_factory()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> FerrumServer:
    """The shared server of the session (no API key, default queue size)."""
    return server_factory()


@pytest.fixture(scope="session")
def client(server: FerrumServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def http(server: FerrumServer) -> Iterator[httpx.Client]:
    with server.http() as http_client:
        yield http_client


@pytest.fixture(scope="session")
def server_at(ferrum_bin: Path, config_file: Path) -> Iterator[Callable[..., FerrumServer]]:
    """Starts a server on a given working directory: `server_at(workdir, *args, database_url=None)`.

    On the workdir of a server that was stopped or killed (`FerrumServer.kill()`, i.e. kill -9)
    it reopens the same SQLite database and the same default data dir (`files` next to the
    database): a restart. The previous server.log is kept as server.log.1, .2, ... With
    `database_url` the server uses that database instead (e.g. one Postgres for two servers).
    Servers still running at the end of the session are stopped."""
    started: list[FerrumServer] = []

    def start(workdir: Path, *args: str, database_url: str | None = None) -> FerrumServer:
        log = workdir / "server.log"
        if log.exists():
            n = 1
            while (workdir / f"server.log.{n}").exists():
                n += 1
            log.rename(workdir / f"server.log.{n}")
        server = FerrumServer(ferrum_bin, config_file, workdir, list(args), database_url=database_url)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
