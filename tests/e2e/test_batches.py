"""The Batch API on /v1/chat/completions: creation and its errors, the batch object through its
lifecycle, output and error files, whole-batch validation failures, per-line request errors,
cancellation, listing, and billing at half the tier price."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import openai
import pytest

from helpers import (
    BAN_EOS,
    CHAT_ENDPOINT,
    LONG_ANSWER_PROMPT,
    NANO,
    TERMINAL_BATCH_STATUSES,
    assert_error,
    assert_error_shape,
    batch_line,
    cost_usd,
    file_jsonl,
    upload_jsonl,
    usage_by_model,
    wait_for_batch,
)

# The fields of a completed batch (the spec types the timestamps, ids and `errors` as integers,
# strings and an object, not nullable, so those not set are absent rather than null).
BATCH_KEYS = {
    "id", "object", "endpoint", "input_file_id", "completion_window", "status",
    "output_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "request_counts", "metadata", "model", "usage",
}
UNSET_BATCH_KEYS = {"errors", "error_file_id", "failed_at", "expired_at", "cancelling_at", "cancelled_at"}
PROMPTS = ["Say hello.", "Name a color.", "Count to three."]


def create_batch(client, lines: list[dict], metadata: dict | None = None):
    """Uploads `lines` as a batch file and creates a 24h batch on /v1/chat/completions."""
    uploaded = upload_jsonl(client, lines)
    kwargs = {} if metadata is None else {"metadata": metadata}
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT_ENDPOINT, completion_window="24h", **kwargs
    )


def by_custom_id(lines: list[dict]) -> dict[str, dict]:
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), f"a custom_id appears twice: {sorted(ids)}"
    return {line["custom_id"]: line for line in lines}


def check_result_line(line: dict, status_code: int) -> None:
    """The shape of an output/error file line: {id batch_req_..., custom_id, response
    {status_code, request_id, body}, error null}."""
    assert isinstance(line.get("id"), str) and line["id"].startswith("batch_req_"), line
    assert isinstance(line.get("custom_id"), str), line
    assert "error" in line and line["error"] is None, line
    response = line["response"]
    assert response["status_code"] == status_code, line
    assert isinstance(response["request_id"], str) and response["request_id"], line
    assert isinstance(response["body"], dict), line


@dataclass
class Finished:
    created: openai.types.Batch
    batch: openai.types.Batch
    lines: list[dict]
    output: list[dict]
    errors: list[dict]
    started: int
    metadata: dict


@pytest.fixture(scope="module")
def completed_batch(client) -> Finished:
    """A three-line batch on the shared server, run to its end."""
    lines = [batch_line(f"req-{i}", messages=[{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)]
    metadata = {"suite": "e2e", "run": uuid.uuid4().hex}
    started = int(time.time())
    created = create_batch(client, lines, metadata)
    batch = wait_for_batch(client, created.id)
    return Finished(
        created=created,
        batch=batch,
        lines=lines,
        output=file_jsonl(client, batch.output_file_id),
        errors=file_jsonl(client, batch.error_file_id),
        started=started,
        metadata=metadata,
    )


# --- a batch that completes ------------------------------------------------------------------


def test_created_batch_object(completed_batch):
    """POST /v1/batches answers a batch object: id batch_..., the request's fields, status
    validating (or already in_progress), expires_at 24 h after created_at."""
    created = completed_batch.created
    assert created.id.startswith("batch_"), created
    assert created.object == "batch"
    assert created.endpoint == CHAT_ENDPOINT
    assert created.completion_window == "24h"
    assert created.input_file_id == completed_batch.batch.input_file_id
    assert created.input_file_id.startswith("file-"), created
    assert created.status in {"validating", "in_progress"}, created
    assert completed_batch.started - 1 <= created.created_at <= int(time.time()) + 1, created
    assert created.expires_at == created.created_at + 86400, created
    assert created.metadata == completed_batch.metadata, created
    for field in ("failed_at", "expired_at", "cancelling_at", "cancelled_at"):
        assert getattr(created, field) is None, (field, created)


def test_batch_object_has_every_field(http, completed_batch):
    """The raw batch object carries every field of the spec that applies (absent where not)."""
    response = http.get(f"/v1/batches/{completed_batch.batch.id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert BATCH_KEYS <= body.keys(), f"batch object lacks {sorted(BATCH_KEYS - body.keys())}: {body}"
    assert not UNSET_BATCH_KEYS & body.keys(), body
    assert set(body["request_counts"]) >= {"total", "completed", "failed"}, body
    usage = body["usage"]
    assert {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"} <= usage.keys(), body
    assert "cached_tokens" in usage["input_tokens_details"], body
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0, body


def test_batch_completes_with_timestamps_and_counts(completed_batch):
    """The batch ends completed with all lines counted, and its timestamps in lifecycle order."""
    batch = completed_batch.batch
    assert batch.status == "completed", batch
    assert batch.id == completed_batch.created.id
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 3, 0), counts
    assert batch.in_progress_at is not None and batch.finalizing_at is not None, batch
    assert batch.completed_at is not None, batch
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at, batch
    assert batch.completed_at <= int(time.time()) + 1, batch
    assert batch.expires_at == batch.created_at + 86400, batch
    for field in ("failed_at", "expired_at", "cancelling_at", "cancelled_at", "error_file_id", "errors"):
        assert getattr(batch, field) is None, (field, batch)
    assert batch.metadata == completed_batch.metadata, batch
    assert batch.model == NANO, batch


def test_output_file_holds_one_completion_per_line(client, completed_batch):
    """The output file (purpose batch_output) has one line per request, keyed by custom_id, each
    a 200 response whose body is a chat.completion."""
    batch = completed_batch.batch
    assert batch.output_file_id is not None, batch
    info = client.files.retrieve(batch.output_file_id)
    assert info.purpose == "batch_output", info
    assert info.bytes == len(client.files.content(batch.output_file_id).content), info

    output = by_custom_id(completed_batch.output)
    assert set(output) == {line["custom_id"] for line in completed_batch.lines}, output
    assert completed_batch.errors == []
    request_ids = set()
    for custom_id, line in output.items():
        check_result_line(line, 200)
        request_ids.add(line["id"])
        body = line["response"]["body"]
        assert body["object"] == "chat.completion", line
        assert body["id"].startswith("chatcmpl-"), line
        assert body["model"] == NANO, line
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant", line
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"], line
        assert choice["finish_reason"] in ("stop", "length"), line
        usage = body["usage"]
        assert 0 < usage["completion_tokens"] <= 8, line
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], line
    assert len(request_ids) == len(output), f"batch_req ids repeat: {output}"


def test_batch_usage_is_the_sum_of_its_lines(completed_batch):
    """The batch's usage adds up its output bodies' usage."""
    bodies = [line["response"]["body"] for line in completed_batch.output]
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    cached = sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies)
    usage = completed_batch.batch.usage
    assert usage is not None, completed_batch.batch
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        prompt, completion, prompt + completion
    ), usage
    assert usage.input_tokens_details.cached_tokens == cached, usage


def test_input_file_is_kept(client, completed_batch):
    """The input file stays readable, with purpose batch."""
    info = client.files.retrieve(completed_batch.batch.input_file_id)
    assert info.purpose == "batch", info


# --- per-line errors -------------------------------------------------------------------------


def test_request_errors_go_to_the_error_file(client):
    """Lines whose request is invalid (unknown model, temperature 5, a prompt longer than the
    context) fail alone: they are in the error file with their HTTP status and an OpenAI error
    body, counted as failed, and the other lines complete."""
    long_prompt = [{"role": "user", "content": "hello " * 9000}]
    lines = [
        batch_line("ok-1"),
        batch_line("unknown-model", model="gpt-9000"),
        batch_line("hot", temperature=5),
        batch_line("too-long", messages=long_prompt),
        batch_line("ok-2", messages=[{"role": "user", "content": "Name a color."}]),
    ]
    batch = wait_for_batch(client, create_batch(client, lines).id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 2, 3), counts
    assert batch.output_file_id is not None and batch.error_file_id is not None, batch
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"

    output = by_custom_id(file_jsonl(client, batch.output_file_id))
    errors = by_custom_id(file_jsonl(client, batch.error_file_id))
    assert set(output) == {"ok-1", "ok-2"}, output
    assert set(errors) == {"unknown-model", "hot", "too-long"}, errors
    expected_status = {"unknown-model": 404, "hot": 400, "too-long": 400}
    for custom_id, line in errors.items():
        check_result_line(line, expected_status[custom_id])
        error = assert_error_shape(line["response"]["body"])
        assert error["type"] == "invalid_request_error", line
    assert errors["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found", errors
    assert errors["hot"]["response"]["body"]["error"]["param"] == "temperature", errors
    for line in output.values():
        check_result_line(line, 200)


def test_all_lines_failing_gives_no_output_file(client):
    """A batch whose every line fails completes with only an error file."""
    lines = [batch_line("bad-1", model="gpt-9000"), batch_line("bad-2", temperature=5)]
    batch = wait_for_batch(client, create_batch(client, lines).id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (2, 0, 2), counts
    assert batch.output_file_id is None, batch
    assert set(by_custom_id(file_jsonl(client, batch.error_file_id))) == {"bad-1", "bad-2"}


# --- whole-batch validation ------------------------------------------------------------------


def test_line_with_another_endpoint_fails_the_batch(client):
    """A line whose url is not the batch's endpoint fails the whole batch, with an error naming
    its (1-based) line; nothing is run."""
    lines = [batch_line("a"), {**batch_line("b"), "url": "/v1/embeddings"}, batch_line("c")]
    check_validation_failure(client, lines, bad_line=2)


def test_duplicate_custom_id_fails_the_batch(client):
    """A custom_id used twice fails the whole batch, with an error naming the repeated line."""
    lines = [batch_line("a"), batch_line("b"), batch_line("a"), batch_line("d")]
    check_validation_failure(client, lines, bad_line=3)


GOOD = batch_line("request-1")
BAD_BATCH_LINES = {
    "not_json": b'{"custom_id": "x", "method": "POST",',
    "not_an_object": b"[1, 2, 3]",
    "missing_custom_id": json.dumps({k: v for k, v in GOOD.items() if k != "custom_id"}).encode(),
    "custom_id_not_string": json.dumps({**GOOD, "custom_id": 3}).encode(),
    "method_get": json.dumps({**GOOD, "method": "GET"}).encode(),
    "missing_url": json.dumps({k: v for k, v in GOOD.items() if k != "url"}).encode(),
    "url_not_string": json.dumps({**GOOD, "url": 7}).encode(),
    "body_not_object": json.dumps({**GOOD, "body": "hello"}).encode(),
    "missing_body": json.dumps({k: v for k, v in GOOD.items() if k != "body"}).encode(),
}


@pytest.mark.parametrize("bad", BAD_BATCH_LINES.values(), ids=BAD_BATCH_LINES.keys())
def test_bad_lines_fail_the_batch_naming_each_line(client, bad):
    """A malformed line (lines 3 and 5 here) is accepted at upload; the batch created on the
    file goes `failed` with one error per bad line, naming it, and runs nothing."""
    ok = lambda i: json.dumps(batch_line(f"ok-{i}")).encode()  # noqa: E731
    content = b"\n".join([ok(1), ok(2), bad, ok(4), bad, ok(6)]) + b"\n"
    uploaded = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT_ENDPOINT, completion_window="24h")
    check_validation_failure(client, batch.id, bad_line=3)
    failed = client.batches.retrieve(batch.id)
    assert {e.line for e in failed.errors.data} == {3, 5}, failed.errors


def check_validation_failure(client, lines: list[dict] | str, bad_line: int) -> None:
    batch_id = lines if isinstance(lines, str) else create_batch(client, lines).id
    batch = wait_for_batch(client, batch_id)
    assert batch.status == "failed", batch
    assert batch.failed_at is not None and batch.failed_at >= batch.created_at, batch
    assert batch.completed_at is None and batch.output_file_id is None, batch
    assert batch.errors is not None and batch.errors.object == "list", batch
    assert batch.errors.data, batch
    for error in batch.errors.data:
        assert error.code and error.message, error
    assert bad_line in {error.line for error in batch.errors.data}, batch.errors
    if batch.request_counts is not None:
        assert batch.request_counts.completed == 0, batch


# --- creation errors -------------------------------------------------------------------------


def batch_request(file_id: str, **overrides) -> dict:
    body = {"input_file_id": file_id, "endpoint": CHAT_ENDPOINT, "completion_window": "24h"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture(scope="module")
def batch_file_id(client) -> str:
    return upload_jsonl(client, [batch_line("only")]).id


def test_unknown_input_file_is_404(client, http):
    """A batch on a file id that does not exist is a 404."""
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-doesnotexist", endpoint=CHAT_ENDPOINT, completion_window="24h"
        )
    assert_error(http.post("/v1/batches", json=batch_request("file-doesnotexist")), 404)


def test_input_file_of_another_purpose_is_400(client, http):
    """A batch's input file must have purpose batch."""
    notes = client.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="user_data")
    assert_error(http.post("/v1/batches", json=batch_request(notes.id)), 400)
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=notes.id, endpoint=CHAT_ENDPOINT, completion_window="24h")


@pytest.mark.parametrize(
    "overrides",
    [
        {"completion_window": "1h"},
        {"completion_window": None},
        {"endpoint": "/v1/moderations"},
        {"endpoint": "/v1/completions"},
        {"endpoint": None},
        {"input_file_id": None},
        {"metadata": "not an object"},
    ],
    ids=["window_1h", "no_window", "moderations", "completions", "no_endpoint", "no_input_file", "bad_metadata"],
)
def test_invalid_batch_request_is_400(http, batch_file_id, overrides):
    """Only the 24h window and the chat, responses and embeddings endpoints are supported;
    required fields must be present."""
    assert_error(http.post("/v1/batches", json=batch_request(batch_file_id, **overrides)), 400)


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("POST", "/cancel")])
def test_unknown_batch_is_404(http, method, suffix):
    """Retrieving or cancelling an unknown batch is a 404."""
    assert_error(http.request(method, f"/v1/batches/batch_doesnotexist{suffix}"), 404)


# --- list ------------------------------------------------------------------------------------


def test_list_batches_newest_first(client, http):
    """GET /v1/batches lists newest first (also within one second); limit and after page
    through them."""
    ids = []
    for i in range(3):
        ids.append(create_batch(client, [batch_line(f"l{i}", max_tokens=1)]).id)
    newest = ids[::-1]
    page = http.get("/v1/batches", params={"limit": 2}).json()
    assert page["object"] == "list", page
    assert [b["id"] for b in page["data"]] == newest[:2], (newest, page)
    assert page["has_more"] is True, page
    assert (page["first_id"], page["last_id"]) == (newest[0], newest[1]), page
    after = http.get("/v1/batches", params={"limit": 2, "after": page["last_id"]}).json()
    assert after["data"][0]["id"] == newest[2], (newest, after)
    # The SDK pages through the whole list; each batch appears once.
    listed = [b.id for b in client.batches.list(limit=2)]
    assert listed[:3] == newest, listed
    assert len(listed) == len(set(listed)), listed
    for batch_id in ids:
        assert wait_for_batch(client, batch_id).status == "completed"


# --- cancellation ----------------------------------------------------------------------------


def test_cancel_a_running_batch(server_factory):
    """Cancelling a long batch in progress moves it through cancelling to cancelled; lines not
    yet run are not run, finished lines are in the output file."""
    server = server_factory("--max-running", "2")
    try:
        client = server.client()
        lines = [
            batch_line(f"long-{i}", messages=LONG_ANSWER_PROMPT, max_tokens=200, logit_bias=BAN_EOS)
            for i in range(30)
        ]
        created = create_batch(client, lines)
        wait_for_batch(client, created.id, statuses={"in_progress"} | TERMINAL_BATCH_STATUSES)
        cancelled = client.batches.cancel(created.id)
        assert cancelled.id == created.id
        assert cancelled.status in ("cancelling", "cancelled"), cancelled
        assert cancelled.cancelling_at is not None, cancelled

        batch = wait_for_batch(client, created.id)
        assert batch.status == "cancelled", batch
        assert batch.cancelled_at is not None and batch.cancelling_at is not None, batch
        assert batch.cancelling_at <= batch.cancelled_at, batch
        counts = batch.request_counts
        assert counts.total == 30, counts
        assert counts.completed < 30, counts
        output = by_custom_id(file_jsonl(client, batch.output_file_id))
        assert set(output) <= {line["custom_id"] for line in lines}, output
        assert len(output) == counts.completed, (counts, sorted(output))
        for line in output.values():
            check_result_line(line, 200)
    finally:
        server.stop()


# --- billing ---------------------------------------------------------------------------------


def test_batch_lines_are_billed_at_half_price(fresh_server):
    """On a fresh server, a batch's lines are recorded in /v1/usage with their tokens and half
    the interactive cost."""
    client = fresh_server.client()
    lines = [
        batch_line(f"bill-{i}", messages=[{"role": "user", "content": p}], max_tokens=8)
        for i, p in enumerate(PROMPTS)
    ]
    batch = wait_for_batch(client, create_batch(client, lines).id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    bodies = [line["response"]["body"] for line in file_jsonl(client, batch.output_file_id)]
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    cached = sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies)
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)

    with fresh_server.http() as http:
        deadline = time.monotonic() + 5
        while True:
            entry = usage_by_model(http).get(NANO)
            if (entry and entry["requests"] == 3) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert entry is not None, "no usage recorded for the batch"
    assert (entry["requests"], entry["prompt_tokens"], entry["cached_tokens"], entry["completion_tokens"]) == (
        3, prompt, cached, completion
    ), entry
    full_price = cost_usd(NANO, prompt, cached, completion)  # at PRICES[NANO]
    assert full_price > 0
    assert entry["cost_usd"] == pytest.approx(0.5 * full_price, abs=1e-9), (entry, full_price)
