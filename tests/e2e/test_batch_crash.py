"""Batches survive their server: after kill -9 mid-batch, a new process on the same database and
data dir takes over the dead worker's lines once their lease expires, and the batch completes with
every line run to a single result and billed once; two servers on one Postgres share a batch's
lines without running any twice."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from typing import Iterator
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from helpers import (
    BAN_EOS,
    CHAT_ENDPOINT,
    NANO,
    batch_line,
    file_jsonl,
    metric_sum,
    to_jsonl,
    usage_by_model,
    wait_for_batch,
)

LINES = 40
BATCH_LINES_METRIC = "ferrum_batch_lines_total"


def crash_lines(prefix: str, max_tokens: int) -> list[dict]:
    """LINES distinct greedy requests, each generating exactly `max_tokens` tokens."""
    return [
        batch_line(
            f"{prefix}-{i:02d}",
            messages=[{"role": "user", "content": f"Count from {i} to {i + 30}, one number per line."}],
            max_tokens=max_tokens,
            temperature=0,
            logit_bias=BAN_EOS,
        )
        for i in range(LINES)
    ]


def check_each_line_once(client, batch, custom_ids: list[str]) -> None:
    """The batch completed, and each custom_id has exactly one result, in the output file."""
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts.total == LINES, counts
    assert counts.completed + counts.failed == LINES, counts
    output = file_jsonl(client, batch.output_file_id)
    errors = file_jsonl(client, batch.error_file_id)
    seen = Counter(line["custom_id"] for line in output + errors)
    repeated = {k: n for k, n in seen.items() if n > 1}
    assert not repeated, f"custom_ids with more than one result: {repeated}"
    assert set(seen) == set(custom_ids), f"missing: {sorted(set(custom_ids) - set(seen))}"
    assert sorted(line["custom_id"] for line in output) == sorted(custom_ids), (
        f"lines not in the output file: {errors}"
    )
    for line in output:
        assert line["response"]["status_code"] == 200, line
    assert len({line["id"] for line in output}) == LINES, "batch_req ids repeat"


def test_batch_survives_kill_9(server_factory, server_at):
    """kill -9 while a batch is in progress; a new process on the same workdir finishes it: each
    line exactly once in the output, request_counts right, 40 requests billed."""
    first = server_factory("--batch-lease-secs", "2", "--max-running", "2")
    client = first.client()
    lines = crash_lines("crash", max_tokens=24)
    custom_ids = [line["custom_id"] for line in lines]
    content = to_jsonl(lines)
    uploaded = client.files.create(file=("crash.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT_ENDPOINT, completion_window="24h"
    )

    deadline = time.monotonic() + 180
    while True:
        state = client.batches.retrieve(batch.id)
        counts = state.request_counts
        done = counts.completed if counts else 0
        if state.status == "in_progress" and done >= 5:
            first.kill()
            break
        assert state.status in ("validating", "in_progress"), (
            f"the batch reached {state.status!r} before the kill (completed {done}/{LINES}); "
            f"it must be made longer for this test: {state.model_dump()}"
        )
        assert time.monotonic() < deadline, f"no 5 lines done in 180 s: {state.model_dump()}"
        time.sleep(0.05)
    assert done < LINES, f"the whole batch was done before the kill: {state.model_dump()}"
    print(f"killed {first.process.pid} with {done}/{LINES} lines completed")

    second = server_at(first.workdir, "--batch-lease-secs", "2", "--max-running", "2")
    client = second.client()
    assert client.files.content(uploaded.id).content == content, "the input file did not survive"
    final = wait_for_batch(client, batch.id, timeout=300)
    check_each_line_once(client, final, custom_ids)

    with second.http() as http:
        rerun = metric_sum(http, BATCH_LINES_METRIC)
        print(f"lines run by the second process: {rerun}")
        assert 0 < rerun <= LINES - done, (
            f"the second process ran {rerun} lines; {done} were already done before the kill"
        )
        deadline = time.monotonic() + 5
        while True:
            nano = usage_by_model(http).get(NANO, {"requests": 0})
            if nano["requests"] >= LINES or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert nano["requests"] == LINES, f"batch lines must be billed exactly once: {nano}"
    second.stop()


# --- two servers on one Postgres ------------------------------------------------------------

POSTGRES_URL = os.environ.get("FERRUM_TEST_POSTGRES_URL")


def pg_binary(name: str) -> str:
    """A Postgres client binary: on PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert candidates, f"{name} not found on PATH or under /usr/lib/postgresql"
    return candidates[-1]


def pg_connection_args(url: str) -> list[str]:
    """createdb/dropdb arguments (-h, -p, -U) for a postgres:// URL (host=/socket/dir in its
    query is a Unix socket directory)."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    args = ["-h", host]
    if parts.port:
        args += ["-p", str(parts.port)]
    if parts.username:
        args += ["-U", parts.username]
    return args


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A new, empty database on the test cluster of $FERRUM_TEST_POSTGRES_URL; its URL. Dropped
    afterwards (best effort)."""
    assert POSTGRES_URL
    parts = urlsplit(POSTGRES_URL)
    name = f"ferrum_e2e_{uuid.uuid4().hex[:12]}"
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    conn = pg_connection_args(POSTGRES_URL)
    created = subprocess.run(
        [pg_binary("createdb"), *conn, name], capture_output=True, text=True, env=env, timeout=60
    )
    assert created.returncode == 0, f"createdb {name} failed: {created.stderr}"
    yield urlunsplit(parts._replace(path=f"/{name}"))
    subprocess.run(
        [pg_binary("dropdb"), *conn, "--if-exists", "--force", name],
        capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="FERRUM_TEST_POSTGRES_URL is not set (scripts/test.sh starts a throwaway Postgres)",
)
def test_two_servers_share_a_batch_on_postgres(server_at, postgres_database, tmp_path):
    """Two servers on one Postgres database and one data dir: a batch uploaded and created
    through one completes through the other, each line run once in all."""
    data_dir = tmp_path / "files"
    data_dir.mkdir()
    servers = [
        server_at(tmp_path / name, "--data-dir", str(data_dir), database_url=postgres_database)
        for name in ("a", "b")
    ]
    try:
        a, b = (server.client() for server in servers)
        lines = crash_lines("pg", max_tokens=16)
        custom_ids = [line["custom_id"] for line in lines]
        uploaded = a.files.create(file=("shared.jsonl", to_jsonl(lines)), purpose="batch")
        batch = a.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT_ENDPOINT, completion_window="24h"
        )
        final = wait_for_batch(b, batch.id, timeout=300)
        check_each_line_once(b, final, custom_ids)

        ran = []
        for server in servers:
            with server.http() as http:
                ran.append(metric_sum(http, BATCH_LINES_METRIC))
        print(f"{BATCH_LINES_METRIC}: server a {ran[0]}, server b {ran[1]}")
        assert sum(ran) == LINES, f"lines run per server {ran}: some line ran twice or not at all"

        with servers[1].http() as http:
            deadline = time.monotonic() + 5
            while True:
                nano = usage_by_model(http).get(NANO, {"requests": 0})
                if nano["requests"] >= LINES or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert nano["requests"] == LINES, f"batch lines must be billed exactly once: {nano}"
    finally:
        for server in servers:
            server.stop()
