"""Shared constants and assertions for the end-to-end tests of `ferrum serve`."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator

import httpx

import spec_check

NANO = "gpt-4.1-nano"
NANO_ALIAS = "gpt-4.1-nano-2025-04-14"
MINI = "gpt-4.1-mini"
MINI_ALIAS = "gpt-4.1-mini-2025-04-14"

# USD per 1M tokens, exactly as written into the test ferrum.toml (see conftest.CONFIG_TEMPLATE).
PRICES = {
    NANO: {"input": 0.10, "cached_input": 0.025, "output": 0.40},
    MINI: {"input": 0.40, "cached_input": 0.10, "output": 1.60},
}

# SmolLM2's end-of-generation tokens: <|endoftext|> (0) and <|im_end|> (2). Banning both makes
# the model generate until max_tokens, for tests that need a long (or exactly sized) generation.
BAN_EOS = {"0": -100, "2": -100}

# A prompt the model answers at length (it does not stop within a few dozen tokens).
LONG_ANSWER_PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]
SHORT_PROMPT = [{"role": "user", "content": "Say hello."}]

_MISSING = object()
ANY = object()


def chat_body(**overrides: Any) -> dict:
    """A small valid chat completion request body, with `overrides` applied (None removes a key)."""
    body: dict = {"model": NANO, "messages": SHORT_PROMPT, "max_tokens": 8, "temperature": 0}
    for key, value in overrides.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def assert_error_shape(payload: Any) -> dict:
    """Checks `{"error": {"message", "type", "param", "code"}}` and returns the inner object."""
    assert isinstance(payload, dict) and "error" in payload, f"not an error object: {payload!r}"
    error = payload["error"]
    assert isinstance(error, dict), f"error is not an object: {payload!r}"
    missing = {"message", "type", "param", "code"} - error.keys()
    assert not missing, f"error object lacks {sorted(missing)}: {payload!r}"
    assert isinstance(error["message"], str) and error["message"], f"empty message: {payload!r}"
    assert isinstance(error["type"], str) and error["type"], f"bad type: {payload!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"bad param: {payload!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"bad code: {payload!r}"
    return error


def assert_error(
    response: httpx.Response,
    status: int,
    *,
    param: Any = ANY,
    code: Any = ANY,
    type: Any = _MISSING,
) -> dict:
    """Checks an OpenAI-style error response: status, shape, and `param`/`code`/`type` when given.

    `type` defaults to "invalid_request_error" for 400 and 404, as in the OpenAI API.
    """
    try:
        payload = response.json()
    except ValueError:
        raise AssertionError(
            f"HTTP {response.status_code}, body is not JSON: {response.text[:500]!r}"
        ) from None
    assert response.status_code == status, (
        f"expected HTTP {status}, got {response.status_code}: {payload!r}"
    )
    assert response.headers.get("content-type", "").startswith("application/json"), (
        f"error content-type is {response.headers.get('content-type')!r}"
    )
    error = assert_error_shape(payload)
    if type is _MISSING and status in (400, 404):
        type = "invalid_request_error"
    if type is not _MISSING:
        assert error["type"] == type, f"type {error['type']!r} != {type!r}: {payload!r}"
    if param is not ANY:
        assert error["param"] == param, f"param {error['param']!r} != {param!r}: {payload!r}"
    if code is not ANY:
        assert error["code"] == code, f"code {error['code']!r} != {code!r}: {payload!r}"
    return error


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Yields the `data:` payloads of server-sent-events lines (`response.iter_lines()`), in order."""
    for line in lines:
        if line.startswith("data:"):
            yield line[len("data:"):].strip()
        else:
            # Blank separators, comments (":") and other fields carry no data.
            assert line == "" or line.startswith((":", "event:", "id:", "retry:")), (
                f"unexpected SSE line: {line!r}"
            )


def read_stream(lines: Iterable[str]) -> tuple[list[dict], bool]:
    """All JSON chunks of an SSE chat completion stream (`response.iter_lines()`, or what is
    left of it) and whether `data: [DONE]` ended it."""
    chunks: list[dict] = []
    done = False
    for data in sse_data(lines):
        assert not done, f"data after [DONE]: {data!r}"
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" not in chunk:
            spec_check.check_stream_event("POST", "/v1/chat/completions", chunk)
        chunks.append(chunk)
    return chunks, done


def cost_usd(model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
    """The price of a request per the tier prices of the test configuration."""
    price = PRICES[model]
    return (
        (prompt_tokens - cached_tokens) * price["input"] / 1e6
        + cached_tokens * price["cached_input"] / 1e6
        + completion_tokens * price["output"] / 1e6
    )


# --- files, batches and stored completions --------------------------------------------------

CHAT_ENDPOINT = "/v1/chat/completions"
TERMINAL_BATCH_STATUSES = {"completed", "failed", "expired", "cancelled"}


def read_jsonl(data: bytes | str) -> list[dict]:
    """The JSON objects of a JSONL text, one per non-empty line."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_jsonl(objects: Iterable[Any]) -> bytes:
    """Objects as JSONL bytes (one compact JSON document per line, newline-terminated)."""
    return "".join(json.dumps(obj) + "\n" for obj in objects).encode("utf-8")


def batch_line(custom_id: str, **overrides: Any) -> dict:
    """One line of a batch input file: a chat completion request (`chat_body(**overrides)`)."""
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": chat_body(**overrides)}


def upload_jsonl(client, objects: Iterable[Any], purpose: str = "batch", filename: str = "input.jsonl"):
    """Uploads `objects` as a JSONL file through the SDK; returns the FileObject."""
    return client.files.create(file=(filename, to_jsonl(objects)), purpose=purpose)


def file_jsonl(client, file_id: str | None) -> list[dict]:
    """The JSON lines of a file (an empty list for a None id)."""
    if file_id is None:
        return []
    return read_jsonl(client.files.content(file_id).content)


def wait_for_batch(client, batch_id: str, timeout: float = 180, statuses=TERMINAL_BATCH_STATUSES):
    """Polls GET /v1/batches/{id} until its status is one of `statuses` (default: a terminal
    one); fails after `timeout` s with the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(
                f"batch {batch_id} still {batch.status!r} after {timeout} s "
                f"(waiting for {sorted(statuses)}): {batch.model_dump()}"
            )
        time.sleep(0.2)


def usage_by_model(http: httpx.Client) -> dict[str, dict]:
    """GET /v1/usage as {tier id: totals entry}."""
    response = http.get("/v1/usage")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list", body
    return {entry["model"]: entry for entry in body["data"]}


def metric_sum(http: httpx.Client, name: str) -> float:
    """The sum over all label values of one metric in GET /metrics (Prometheus text)."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    total = 0.0
    for line in response.text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
