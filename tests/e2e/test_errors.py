"""Invalid requests: OpenAI error objects with the right status, type, param and code."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from helpers import ANY, NANO, SHORT_PROMPT, assert_error, chat_body

REMOVE = None  # chat_body(key=None) removes the key

# An assistant turn with two parallel calls (call_a, call_b).
ASSISTANT_CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": f"call_{x}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for x in "ab"
    ],
}


@dataclass
class Case:
    body: Any  # a dict (sent as JSON), a list (sent as JSON) or bytes (sent as they are)
    status: int = 400
    param: Any = ANY
    code: Any = ANY
    param_contains: tuple[str, ...] = ()
    message_contains: tuple[str, ...] = ()


def mentions(message: str, param: str) -> bool:
    """Whether an error message names a parameter (in full, or by its last path segment)."""
    last = re.split(r"[.\[\]]+", param.strip("[]."))[-1] if param else param
    return param in message or last in message


CASES = {
    "body_not_json": Case(b'{"model": "gpt-4.1-nano", messages: ', param=None),
    "body_not_object": Case([1]),
    "missing_model": Case(chat_body(model=REMOVE), param="model"),
    "unknown_model": Case(chat_body(model="gpt-9000"), status=404, code="model_not_found",
                          message_contains=("gpt-9000",)),
    "missing_messages": Case(chat_body(messages=REMOVE), param="messages",
                             code="missing_required_parameter"),
    "empty_messages": Case(chat_body(messages=[]), param="messages", code="empty_array"),
    "messages_not_array": Case(chat_body(messages="hi"), param="messages", code="invalid_type"),
    "invalid_role": Case(chat_body(messages=[{"role": "wizard", "content": "hi"}]),
                         param="messages[0].role", code="invalid_value"),
    "missing_content": Case(chat_body(messages=[{"role": "user"}]),
                            param="messages[0].content", code="missing_required_parameter"),
    "temperature_above_max": Case(chat_body(temperature=3), param="temperature",
                                  code="decimal_above_max_value"),
    "temperature_below_min": Case(chat_body(temperature=-1), param="temperature",
                                  code="decimal_below_min_value"),
    "temperature_wrong_type": Case(chat_body(temperature="hot"), param="temperature",
                                   code="invalid_type"),
    "top_p_above_max": Case(chat_body(top_p=1.5), param="top_p"),
    "n_zero": Case(chat_body(n=0), param="n", code="integer_below_min_value"),
    "n_above_max": Case(chat_body(n=129), param="n", code="integer_above_max_value"),
    "max_tokens_too_large": Case(chat_body(max_tokens=40000), param="max_tokens"),
    "max_completion_tokens_too_large": Case(
        chat_body(max_tokens=REMOVE, max_completion_tokens=40000), param="max_completion_tokens"
    ),
    "five_stop_sequences": Case(chat_body(stop=["a", "b", "c", "d", "e"]), param="stop",
                                code="array_above_max_length"),
    "top_logprobs_above_max": Case(chat_body(logprobs=True, top_logprobs=21), param="top_logprobs"),
    "top_logprobs_without_logprobs": Case(chat_body(top_logprobs=2), param="top_logprobs"),
    "logit_bias_above_max": Case(chat_body(logit_bias={"905": 101}), param="logit_bias"),
    "logit_bias_non_numeric_key": Case(chat_body(logit_bias={"abc": 1}), param="logit_bias"),
    "presence_penalty_above_max": Case(chat_body(presence_penalty=3), param="presence_penalty"),
    "frequency_penalty_below_min": Case(chat_body(frequency_penalty=-3), param="frequency_penalty"),
    "stream_options_without_stream": Case(chat_body(stream_options={"include_usage": True}),
                                          param="stream_options"),
    "unknown_field": Case(chat_body(foo=1), message_contains=("foo",)),
    "tool_message_without_tool_call_id": Case(
        chat_body(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]),
        param_contains=("messages[1]", "tool_call_id"),
    ),
    "tool_message_without_a_call": Case(
        chat_body(messages=[{"role": "user", "content": "hi"},
                            {"role": "tool", "tool_call_id": "call_1", "content": "42"}]),
        param="messages.[1].role", code=None,
    ),
    "tool_message_answering_an_unknown_call": Case(
        chat_body(messages=[{"role": "user", "content": "hi"}, ASSISTANT_CALLS,
                            {"role": "tool", "tool_call_id": "call_zz", "content": "42"}]),
        param="messages.[2].tool_call_id", code=None, message_contains=("call_zz",),
    ),
    "tool_call_left_unanswered": Case(
        chat_body(messages=[{"role": "user", "content": "hi"}, ASSISTANT_CALLS,
                            {"role": "tool", "tool_call_id": "call_a", "content": "42"}]),
        param_contains=("messages.[1]",), code=None, message_contains=("call_b",),
    ),
    "prediction_with_two_choices": Case(
        chat_body(n=2, prediction={"type": "content", "content": "Hello"}), param="n",
        code="invalid_value",
    ),
    "unknown_content_part_type": Case(
        chat_body(messages=[{"role": "user", "content": [{"type": "hologram", "text": "hi"}]}]),
        param_contains=("messages[0].content[0]",),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_invalid_chat_request(http, case: Case):
    """An invalid chat request is rejected with the OpenAI error object, param and code."""
    if isinstance(case.body, bytes):
        response = http.post(
            "/v1/chat/completions", content=case.body, headers={"content-type": "application/json"}
        )
    else:
        response = http.post("/v1/chat/completions", json=case.body)
    error = assert_error(response, case.status, param=case.param, code=case.code)
    for fragment in case.param_contains:
        assert error["param"] is not None and fragment in error["param"], error
    for fragment in case.message_contains:
        assert fragment in error["message"], error
    if isinstance(case.param, str):
        assert mentions(error["message"], case.param), f"message does not name {case.param}: {error}"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "text/html; charset=utf-8"],
)
def test_a_body_that_is_not_json_is_refused(http, content_type):
    """A body declared as something else than JSON gets an OpenAI error, never a generation,
    even when its bytes happen to be JSON."""
    body = json.dumps(chat_body()).encode()
    response = http.post("/v1/chat/completions", content=body,
                         headers={"content-type": content_type})
    error = assert_error(response, 400)
    assert "JSON" in error["message"], error
    # A form as curl -d sends it.
    response = http.post("/v1/chat/completions", data={"model": NANO, "messages": "hi"})
    assert_error(response, 400)


def test_context_length_exceeded(http):
    """A prompt longer than the context window is a 400 context_length_exceeded naming the numbers."""
    body = chat_body(messages=[{"role": "user", "content": "hello " * 10000}])
    error = assert_error(
        http.post("/v1/chat/completions", json=body), 400, code="context_length_exceeded"
    )
    numbers = [int(n) for n in re.findall(r"\d+", error["message"].replace(",", ""))]
    assert 8192 in numbers, f"the context window (8192) is not named: {error}"
    assert any(n > 8192 for n in numbers), f"the prompt's token count is not named: {error}"


def test_unknown_route_is_404(http):
    """An unknown route is a 404 in the OpenAI error shape."""
    assert_error(http.post("/v1/nonexistent", json={}), 404)


def test_unknown_get_route_is_404(http):
    """An unknown GET route is a 404 in the OpenAI error shape too."""
    assert_error(http.get("/v1/nonexistent"), 404)


def test_sdk_bad_request(client):
    """The SDK raises BadRequestError with the server's param and code."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NANO, messages=SHORT_PROMPT, temperature=3)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
    assert caught.value.code == "decimal_above_max_value"
    assert caught.value.type == "invalid_request_error"


def test_sdk_unknown_model(client):
    """The SDK raises NotFoundError with code model_not_found for a chat with an unknown model."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9000", messages=SHORT_PROMPT)
    assert caught.value.code == "model_not_found"


def test_server_still_serves_after_errors(client):
    """After the invalid requests the server answers a valid one normally."""
    completion = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=2, temperature=0
    )
    assert completion.choices[0].message.content
