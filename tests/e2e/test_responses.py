"""The Responses API through the official SDK: stateful conversations (previous_response_id, with
the prefix cache serving earlier turns), the typed event stream in the spec's order, function
call round trips, Structured Outputs via text.format, retrieve/delete/input_items, background
responses, truncation, and errors."""

from __future__ import annotations

import json
import time
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

import spec_check
from helpers import NANO, assert_error, sse_data

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": WEATHER,
    "strict": True,
}]


def text_of(response) -> str:
    return "".join(
        part.text
        for item in response.output
        if item.type == "message"
        for part in item.content
        if part.type == "output_text"
    )


def test_a_simple_response_has_the_spec_shape(client):
    r = client.responses.create(model=NANO, input="Say hello.", max_output_tokens=16, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete"), r
    assert r.model == NANO
    assert r.output and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].id.startswith("msg_")
    assert r.output[0].content[0].type == "output_text"
    assert r.output_text == text_of(r) and r.output_text
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert u.output_tokens_details.reasoning_tokens == 0
    assert r.store is True and r.previous_response_id is None
    assert r.text.format.type == "text" and r.tools == [] and r.tool_choice == "auto"


def test_three_turns_through_previous_response_id_reuse_the_cache(client):
    """Each turn continues the stored conversation: its input is the earlier turns plus the new
    message (the same token count as sending the whole conversation explicitly), and the prefix
    cache serves the earlier turns."""
    turns = ["My name is Ada.", "What is my name?", "Spell it backwards."]
    previous = None
    history: list[dict] = []
    responses = []
    for text in turns:
        r = client.responses.create(
            model=NANO, input=text, previous_response_id=previous, max_output_tokens=24,
            temperature=0, instructions="Be brief.",
        )
        assert r.previous_response_id == previous
        responses.append(r)
        history.append({"role": "user", "content": text})
        # The same conversation sent explicitly (store=False, so it leaves nothing behind).
        explicit = client.responses.create(
            model=NANO, input=history, max_output_tokens=16, temperature=0, store=False,
            instructions="Be brief.",
        )
        assert explicit.usage.input_tokens == r.usage.input_tokens, (
            f"turn {len(responses)}: the rebuilt conversation differs from the explicit one"
        )
        history.append({"role": "assistant", "content": r.output_text})
        previous = r.id
    first, second, third = responses
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 1
    assert third.usage.input_tokens > second.usage.input_tokens
    # Turn N+1 reads turn N's tokens from the prefix cache.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16 - 16
    assert third.usage.input_tokens_details.cached_tokens > second.usage.input_tokens_details.cached_tokens
    assert third.usage.input_tokens_details.cached_tokens > 0


def test_streaming_events_follow_the_spec_order(client):
    events = list(client.responses.create(
        model=NANO, input="Count to five.", max_output_tokens=32, temperature=0, stream=True,
    ))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ], types
    assert types[-4:] in (
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"],
    ), types
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and set(types[4:-4]) == {"response.output_text.delta"}
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    text = "".join(d.delta for d in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens > 0
    # The stored response is the streamed one.
    assert client.responses.retrieve(final.id).output_text == text


@pytest.mark.parametrize("extra", [
    {},
    {"tools": TOOLS, "tool_choice": "required"},
    {"include": ["message.output_text.logprobs"], "top_logprobs": 2},
], ids=["text", "function_call", "logprobs"])
def test_every_stream_event_matches_the_spec(http, extra):
    """Each event of a raw Responses stream validates against the spec's ResponseStreamEvent."""
    body = {"model": NANO, "input": "Weather in Paris?", "max_output_tokens": 24,
            "temperature": 0, "stream": True, **extra}
    with http.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(d) for d in sse_data(response.iter_lines()) if d != "[DONE]"]
    for event in events:
        spec_check.check_stream_event("POST", "/v1/responses", event)
    assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=NANO, input="Name three colors.", max_output_tokens=24, temperature=0, store=False)
    plain = client.responses.create(**kwargs)
    streamed = [e for e in client.responses.create(stream=True, **kwargs)]
    assert streamed[-1].response.output_text == plain.output_text


def test_function_call_round_trip(client):
    first = client.responses.create(
        model=NANO, input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    second = client.responses.create(
        model=NANO, previous_response_id=first.id, tools=TOOLS, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}],
        max_output_tokens=32, temperature=0,
    )
    assert second.status in ("completed", "incomplete")
    assert second.output[0].type == "message" and second.output_text
    # The call and its output were part of the second turn's context.
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_streamed_function_call_events(client):
    kwargs = dict(model=NANO, input="Weather in Tokyo?", tools=TOOLS,
                  tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                  max_output_tokens=200)
    plain = client.responses.create(store=False, **kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert done.arguments == args and done.name == "get_weather"
    call = next(i for i in plain.output if i.type == "function_call")
    assert json.loads(args) == json.loads(call.arguments)
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
    finished = next(e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call")
    assert types.index("response.output_item.added") < types.index("response.function_call_arguments.delta")
    assert added.item.id == finished.item.id == done.item_id
    assert types[-1] == "response.completed"
    # The arguments stream as they are generated.
    assert types.count("response.function_call_arguments.delta") > 3, types


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: Literal["low", "medium", "high"]


def test_json_schema_text_format(client):
    # The bounds matter: unbounded, the nano model greedily writes "1111..." until the token
    # limit (status "incomplete", truncated JSON); the grammar enforces them.
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=NANO, input="Describe Paris as JSON.", temperature=0, max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    assert r.status == "completed", r.incomplete_details
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.responses.parse(
        model=NANO, input="Is the sky blue?", text_format=Verdict, temperature=0, max_output_tokens=100,
    )
    assert isinstance(r.output_parsed, Verdict), r


def test_json_object_text_format(client):
    r = client.responses.create(
        model=NANO, input="Give me a JSON object about cats.", temperature=0,
        text={"format": {"type": "json_object"}}, max_output_tokens=64,
    )
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)


def test_retrieve_delete_and_input_items(client):
    r = client.responses.create(
        model=NANO, temperature=0, max_output_tokens=16, metadata={"k": "v"},
        input=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]},
        ],
    )
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    assert got.usage.input_tokens == r.usage.input_tokens
    items = client.responses.input_items.list(r.id)
    assert [i.role for i in items.data] == ["user", "developer"], "newest first by default"
    assert items.data[0].content[0].text == "Capital of France?"
    asc = client.responses.input_items.list(r.id, order="asc", limit=1)
    assert [i.role for i in asc.data] == ["developer"] and asc.has_more
    nxt = client.responses.input_items.list(r.id, order="asc", after=asc.data[0].id)
    assert [i.role for i in nxt.data] == ["user"] and not nxt.has_more
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_store_false_is_not_kept(client):
    r = client.responses.create(model=NANO, input="Hi", store=False, max_output_tokens=16)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(
        model=NANO, input="Write a long story about a dragon.", max_output_tokens=16, temperature=0,
    )
    assert r.status == "incomplete", r.status
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 16


def test_background_response_completes_and_can_be_cancelled(client, http):
    r = client.responses.create(model=NANO, input="Say hi.", background=True, max_output_tokens=16)
    assert r.status == "queued" and r.background is True
    deadline = time.monotonic() + 120
    while r.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, r
        time.sleep(0.2)
        r = client.responses.retrieve(r.id)
    assert r.status in ("completed", "incomplete") and r.output_text

    long = http.post("/v1/responses", json={
        "model": NANO, "input": "Write a long story.", "background": True,
        "max_output_tokens": 2000, "temperature": 0,
    }).json()
    cancelled = client.responses.cancel(long["id"])
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long["id"]).status == "cancelled"
    # A response that is not a background one cannot be cancelled.
    plain = client.responses.create(model=NANO, input="Hi", max_output_tokens=16)
    assert_error(http.post(f"/v1/responses/{plain.id}/cancel"), 400)


def test_unknown_previous_response_is_404(client, http):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=NANO, input="Hi", previous_response_id="resp_doesnotexist")
    assert_error(
        http.post("/v1/responses", json={"model": NANO, "input": "Hi", "previous_response_id": "resp_nope"}),
        404, param="previous_response_id",
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "Hi"}, "model"),
        ({"model": NANO}, "input"),
        ({"model": NANO, "input": 5}, "input"),
        ({"model": NANO, "input": [{"type": "bogus"}]}, "input[0].type"),
        ({"model": NANO, "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"model": NANO, "input": [{"role": "user"}]}, "input[0].content"),
        ({"model": NANO, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": NANO, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0].type"),
        ({"model": NANO, "input": "Hi", "max_output_tokens": 4}, "max_output_tokens"),
        ({"model": NANO, "input": "Hi", "temperature": 3}, "temperature"),
        ({"model": NANO, "input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": NANO, "input": "Hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": NANO, "input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"model": NANO, "input": "Hi", "truncation": "sometimes"}, "truncation"),
        ({"model": NANO, "input": "Hi", "bogus_field": 1}, None),  # as OpenAI: no param
        ({"model": NANO, "input": "Hi", "store": False, "background": True}, "background"),
    ],
    ids=["no_model", "no_input", "input_type", "item_type", "role", "no_content", "no_call_id",
         "image", "max_output_tokens", "temperature", "tool_type", "tool_choice", "format",
         "truncation", "unknown_field", "background_unstored"],
)
def test_bad_requests_are_400_with_the_param(http, body, param):
    assert_error(http.post("/v1/responses", json=body), 400, param=param)


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/responses", json={"model": "gpt-9", "input": "Hi"}), 404, code="model_not_found")


def test_truncation(ferrum_bin, config_file, tmp_path):
    """A conversation longer than the context window: 400 context_length_exceeded by default,
    answered with the oldest items dropped under truncation "auto"."""
    from conftest import FerrumServer

    small = tmp_path / "small.toml"
    small.write_text(config_file.read_text().replace(
        'id = "gpt-4.1-nano"\n', 'id = "gpt-4.1-nano"\ncontext_length = 256\n', 1))
    server = FerrumServer(ferrum_bin, small, tmp_path / "server", [])
    try:
        client = server.client()
        long_input = [{"role": "user", "content": f"Fact {i}: the sky was blue on day {i}."} for i in range(30)]
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=NANO, input=long_input, max_output_tokens=16)
        assert err.value.code == "context_length_exceeded"
        r = client.responses.create(model=NANO, input=long_input, max_output_tokens=16, truncation="auto")
        assert r.status in ("completed", "incomplete") and r.truncation == "auto"
        assert r.usage.input_tokens + 16 <= 256
    finally:
        server.stop()


def test_a_batch_of_responses(client):
    """Batches run /v1/responses lines too: each output body is a response object, stored."""
    from helpers import read_jsonl, to_jsonl, wait_for_batch

    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": NANO, "input": f"Say the number {i}.", "max_output_tokens": 16, "temperature": 0}}
        for i in range(3)
    ]
    uploaded = client.files.create(file=("responses.jsonl", to_jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    out = read_jsonl(client.files.content(batch.output_file_id).read())
    assert sorted(line["custom_id"] for line in out) == ["r0", "r1", "r2"]
    for line in out:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "response", line
        assert body["usage"]["output_tokens"] > 0
        assert client.responses.retrieve(body["id"]).id == body["id"]


@pytest.mark.parametrize(
    "question",
    ["What is the weather in Paris?", "Write a haiku about the sea. Do not call any tool."],
    ids=["call", "text"],
)
def test_auto_streams_text_and_calls_as_generated(tiers_server, question):
    """tool_choice "auto" streamed: text deltas and function_call_arguments deltas arrive as
    they are generated, and the completed response equals the non-streamed output."""
    client = tiers_server.client()
    kwargs = dict(model="gpt-4.1-mini", input=question, tools=TOOLS, temperature=0,
                  max_output_tokens=150)
    plain = client.responses.create(store=False, **kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")

    def shape(output):
        return [(i.type, getattr(i, "name", None), getattr(i, "arguments", None),
                 "".join(c.text for c in i.content) if i.type == "message" else None) for i in output]

    assert shape(final.output) == shape(plain.output)
    types = [e.type for e in events]
    calls = [i for i in plain.output if i.type == "function_call"]
    if calls:
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert args == "".join(c.arguments for c in calls)
        assert types.count("response.function_call_arguments.delta") > len(calls), types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    if len(text) > 40:
        assert types.count("response.output_text.delta") > 3, types


def test_output_text_logprobs_when_included(client):
    """`include: ["message.output_text.logprobs"]` with `top_logprobs` gives each output_text
    part its tokens' log-probabilities, equal to chat completions' for the same conversation;
    streamed deltas carry them too. Without `include` the list stays empty."""
    kwargs = dict(model=NANO, input="Say hello.", temperature=0, max_output_tokens=20)
    plain = client.responses.create(**kwargs)
    assert plain.output[0].content[0].logprobs == []
    r = client.responses.create(include=["message.output_text.logprobs"], top_logprobs=3, **kwargs)
    part = r.output[0].content[0]
    assert part.text == plain.output_text
    assert len(part.logprobs) == r.usage.output_tokens
    assert "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
    chat = client.chat.completions.create(
        model=NANO, messages=[{"role": "user", "content": "Say hello."}], temperature=0,
        max_tokens=20, logprobs=True, top_logprobs=3,
    )
    assert [(t.token, round(t.logprob, 4)) for t in chat.choices[0].logprobs.content] == [
        (t.token, round(t.logprob, 4)) for t in part.logprobs
    ]
    events = list(client.responses.create(
        stream=True, include=["message.output_text.logprobs"], top_logprobs=3, **kwargs))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [t.token for t in streamed] == [t.token for t in part.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [t.token for t in done.logprobs] == [t.token for t in part.logprobs]
