"""POST /v1/chat/completions without streaming: response shape, sampling parameters, caching."""

import time
import uuid

import pytest

from helpers import (
    BAN_EOS,
    LONG_ANSWER_PROMPT,
    MINI,
    MINI_ALIAS,
    NANO,
    NANO_ALIAS,
    SHORT_PROMPT,
    chat_body,
)

FINISH_REASONS = {"stop", "length"}


def post_chat(http, **overrides) -> dict:
    response = http.post("/v1/chat/completions", json=chat_body(**overrides))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_response_shape_raw(http):
    """A completion has every field the spec and the contract require, with the right types."""
    before = int(time.time())
    body = post_chat(http, max_tokens=8)
    after = int(time.time())

    assert isinstance(body["id"], str) and body["id"].startswith("chatcmpl-"), body
    assert body["object"] == "chat.completion", body
    assert before - 1 <= body["created"] <= after + 1, body
    assert body["model"] == NANO, body
    assert isinstance(body["system_fingerprint"], str), body
    assert body["system_fingerprint"].startswith("fp_"), body

    assert len(body["choices"]) == 1, body
    choice = body["choices"][0]
    assert set(choice) >= {"index", "message", "logprobs", "finish_reason"}, choice
    assert choice["index"] == 0
    assert choice["logprobs"] is None, choice
    assert choice["finish_reason"] in FINISH_REASONS, choice
    message = choice["message"]
    assert message["role"] == "assistant", message
    assert isinstance(message["content"], str) and message["content"], message
    assert "refusal" in message and message["refusal"] is None, message

    usage = body["usage"]
    assert usage["prompt_tokens"] > 0, usage
    assert 0 < usage["completion_tokens"] <= 8, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 <= cached < usage["prompt_tokens"], usage
    assert usage["completion_tokens_details"] == {
        **usage["completion_tokens_details"],
        "reasoning_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }, usage


def test_completion_ids_are_unique(http):
    """Two completions get different ids."""
    assert post_chat(http, max_tokens=1)["id"] != post_chat(http, max_tokens=1)["id"]


def test_every_response_carries_a_request_id(http, client):
    """`x-request-id` (distinct per request) and `openai-processing-ms` on answers, streams,
    errors and other routes, as OpenAI sends them; the SDK exposes the id as `_request_id`."""
    seen = set()
    for response in [
        http.post("/v1/chat/completions", json=chat_body(max_tokens=1)),
        http.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True)),
        http.post("/v1/chat/completions", json=chat_body(temperature=5)),
        http.get("/v1/models"),
        http.get("/v1/no-such-route"),
    ]:
        rid = response.headers.get("x-request-id", "")
        assert rid.startswith("req_") and len(rid) > 10, dict(response.headers)
        assert int(response.headers["openai-processing-ms"]) >= 0, dict(response.headers)
        seen.add(rid)
    assert len(seen) == 5
    echoed = http.get("/v1/models", headers={"x-client-request-id": "mine-123"})
    assert echoed.headers["x-client-request-id"] == "mine-123"
    completion = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=1, temperature=0)
    assert completion._request_id and completion._request_id.startswith("req_")


def test_sdk_parses_response(client):
    """The SDK parses a completion into a ChatCompletion with the expected values."""
    completion = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=8, temperature=0
    )
    assert completion.object == "chat.completion"
    assert completion.model == NANO
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0


@pytest.mark.parametrize("alias, tier", [(NANO_ALIAS, NANO), (MINI_ALIAS, MINI), (MINI, MINI)])
def test_model_resolves_to_tier_id(client, alias, tier):
    """A request for an alias (or the lazy tier) is served, and `model` is the tier id."""
    completion = client.chat.completions.create(
        model=alias, messages=SHORT_PROMPT, max_tokens=4, temperature=0
    )
    assert completion.model == tier
    assert completion.choices[0].message.content


def test_greedy_output_matches_llama_cpp(client):
    """Temperature 0 reproduces llama.cpp's greedy reply (so the chat template is applied)."""
    # crates/ferrum-engine/tests/reference/nano.json, chat[2]: a prompt with no near-tie in its first 12 steps.
    completion = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "Write a Python function that checks if a number is prime."}],
        max_tokens=12,
        temperature=0,
    )
    assert completion.choices[0].message.content == "```python\ndef is_prime(n):\n    if"
    assert completion.choices[0].finish_reason == "length"


def test_multi_turn_context_is_used(client):
    """Earlier user and assistant turns are part of the prompt (the model recalls a name)."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada!"},
            {"role": "user", "content": "What is my name?"},
        ],
        max_tokens=12,
        temperature=0,
    )
    assert "Ada" in completion.choices[0].message.content


def test_temperature_zero_is_deterministic(client):
    """The same request at temperature 0 gives the same text twice."""
    texts = {
        client.chat.completions.create(
            model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=24, temperature=0
        ).choices[0].message.content
        for _ in range(2)
    }
    assert len(texts) == 1, texts


def test_seed_makes_sampling_reproducible(client):
    """The same seed at temperature 1 gives the same text twice."""
    texts = {
        client.chat.completions.create(
            model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=24, temperature=1, seed=1234
        ).choices[0].message.content
        for _ in range(2)
    }
    assert len(texts) == 1, texts


def test_tiny_top_p_is_greedy(client):
    """top_p near 0 keeps only the most likely token, so sampling at temperature 1.5 is greedy."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=16)
    greedy = client.chat.completions.create(**request, temperature=0).choices[0].message.content
    for seed in (1, 2):
        nucleus = client.chat.completions.create(
            **request, temperature=1.5, top_p=0.0001, seed=seed
        ).choices[0].message.content
        assert nucleus == greedy


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_the_output(client, penalty):
    """A penalty of 2 on repeated tokens changes the greedy reply of a long answer."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=48, temperature=0)
    plain = client.chat.completions.create(**request).choices[0].message.content
    penalized = client.chat.completions.create(**request, **{penalty: 2}).choices[0].message.content
    assert penalized != plain


def test_different_seeds_sample_differently(client):
    """At temperature 1 the seed matters: three seeds do not all give the same text."""
    texts = {
        client.chat.completions.create(
            model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=24, temperature=1, seed=seed
        ).choices[0].message.content
        for seed in (1, 2, 3)
    }
    assert len(texts) > 1, texts


def test_n_returns_independent_choices(client):
    """n=2 at temperature 1 returns choices 0 and 1, sampled independently, usage over both."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=LONG_ANSWER_PROMPT,
        n=2,
        max_tokens=8,
        temperature=1,
        seed=7,
        logit_bias=BAN_EOS,
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason == "length"
    assert completion.choices[0].message.content != completion.choices[1].message.content
    assert completion.usage.completion_tokens == 16, completion.usage


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_length(client, limit):
    """A token limit of 5 ends the completion with finish_reason length after exactly 5 tokens."""
    completion = client.chat.completions.create(
        model=NANO, messages=LONG_ANSWER_PROMPT, temperature=0, **{limit: 5}
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_large_max_completion_tokens_is_accepted(client):
    """A limit that nearly fills nano's 8192-token context is accepted; the reply ends naturally."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}],
        max_completion_tokens=8000,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"


def test_natural_end_gives_stop(client):
    """A reply that ends on its own has finish_reason stop and fewer tokens than the limit."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}],
        max_tokens=200,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens < 200


def stop_word_from(text: str) -> str:
    """A word from the middle of `text`, first occurring after its start."""
    words = [w for w in text.split() if w.isalpha() and len(w) >= 3]
    assert len(words) >= 3, f"too few words to pick a stop sequence from: {text!r}"
    for word in words[len(words) // 2:] + words[: len(words) // 2]:
        if text.find(word) > 0:
            return word
    raise AssertionError(f"no usable stop word in {text!r}")


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
def test_stop_sequence_truncates(client, as_list):
    """A stop sequence the model produces ends the reply just before it (stop string excluded)."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=32, temperature=0)
    full = client.chat.completions.create(**request).choices[0].message.content
    stop = stop_word_from(full)
    expected = full[: full.find(stop)]

    stops = ["@@never-1@@", "@@never-2@@", "@@never-3@@", stop] if as_list else stop
    completion = client.chat.completions.create(**request, stop=stops)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", (full, stop, choice)
    assert choice.message.content == expected, (full, stop)
    assert stop not in choice.message.content


def test_logprobs(client):
    """logprobs + top_logprobs return one entry per token, with bytes and sorted alternatives."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=LONG_ANSWER_PROMPT,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 8
    for entry in entries:
        assert entry.logprob <= 0.0
        assert entry.bytes is not None and entry.bytes == list(entry.token.encode("utf-8")), entry
        assert len(entry.top_logprobs) == 3, entry
        top = [alt.logprob for alt in entry.top_logprobs]
        assert top == sorted(top, reverse=True), entry
        # Greedy decoding picks the most likely token.
        assert entry.top_logprobs[0].token == entry.token, entry
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4), entry
        for alt in entry.top_logprobs:
            assert alt.bytes == list(alt.token.encode("utf-8")), alt
    joined = b"".join(bytes(entry.bytes) for entry in entries).decode("utf-8")
    assert joined == choice.message.content


def test_logprobs_raw_shape(http):
    """The raw logprobs object has `content` and `refusal`, and each entry the spec's keys."""
    body = post_chat(http, max_tokens=3, logprobs=True, top_logprobs=2)
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) >= {"content", "refusal"}, logprobs
    assert len(logprobs["content"]) == body["usage"]["completion_tokens"], logprobs
    for entry in logprobs["content"]:
        assert set(entry) >= {"token", "logprob", "bytes", "top_logprobs"}, entry
        for alt in entry["top_logprobs"]:
            assert set(alt) >= {"token", "logprob", "bytes"}, alt


@pytest.mark.parametrize("top", [0, 20])
def test_top_logprobs_bounds(client, top):
    """top_logprobs 0 and 20 (the bounds) give that many alternatives per token."""
    completion = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=top
    )
    entries = completion.choices[0].logprobs.content
    assert len(entries) == completion.usage.completion_tokens
    assert all(len(entry.top_logprobs) == top for entry in entries), entries


def test_logprobs_without_alternatives(client):
    """logprobs=true without top_logprobs returns the sampled tokens with empty alternatives."""
    completion = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=4, temperature=0, logprobs=True
    )
    entries = completion.choices[0].logprobs.content
    assert len(entries) == completion.usage.completion_tokens
    assert all(entry.top_logprobs == [] for entry in entries), entries


# Token ids (SmolLM2 vocabulary) of the start of the greedy reply to HAIKU, from llama.cpp's
# reference (crates/ferrum-engine/tests/reference/nano.json, chat[1]): "The waves of the sea, ...".
HAIKU = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about the sea."},
]
HAIKU_TOKENS = {"504": "The", "6147": " waves", "282": " of", "260": " the", "3426": " sea"}


def test_logit_bias_minus_100_bans_tokens(client):
    """Tokens with bias -100 never appear, although the unbiased greedy reply uses them."""
    request = dict(model=NANO, messages=HAIKU, max_tokens=16, temperature=0, logprobs=True)
    baseline = client.chat.completions.create(**request)
    baseline_tokens = {entry.token for entry in baseline.choices[0].logprobs.content}
    banned = set(HAIKU_TOKENS.values())
    assert baseline_tokens & banned, f"the baseline should use a banned token: {baseline_tokens}"

    biased = client.chat.completions.create(
        **request, logit_bias={token_id: -100 for token_id in HAIKU_TOKENS}
    )
    tokens = [entry.token for entry in biased.choices[0].logprobs.content]
    assert not set(tokens) & banned, tokens


def test_logit_bias_plus_100_forces_token(client):
    """A token with bias +100 is chosen at every step, even when sampling at temperature 1."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=SHORT_PROMPT,
        max_tokens=5,
        temperature=1,
        seed=3,
        logprobs=True,
        logit_bias={"905": 100},  # " world"
    )
    choice = completion.choices[0]
    assert [entry.token for entry in choice.logprobs.content] == [" world"] * 5
    assert choice.message.content == " world" * 5


def test_prompt_caching_reports_cached_tokens(client):
    """The same long prompt sent twice in a row reuses the first request's tokens (cached_tokens)."""
    facts = " ".join(f"Fact {i}: {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(25))
    # A fresh nonce first, so the first request cannot reuse anything but the template's header.
    messages = [
        {"role": "system", "content": f"Session {uuid.uuid4().hex}. {facts}"},
        {"role": "user", "content": "Is 7 even or odd?"},
    ]
    first = client.chat.completions.create(model=NANO, messages=messages, max_tokens=4, temperature=0)
    second = client.chat.completions.create(model=NANO, messages=messages, max_tokens=4, temperature=0)

    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 250
    first_cached = first.usage.prompt_tokens_details.cached_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first_cached, (first.usage, second.usage)
    assert second.usage.prompt_tokens // 2 <= cached < second.usage.prompt_tokens, second.usage
    assert second.choices[0].message.content == first.choices[0].message.content


def test_all_roles_and_content_forms(client):
    """system, developer, user (with name), assistant and text-part content are all accepted."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[
            {"role": "system", "content": "You are terse.", "name": "sys"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "Hi!", "name": "ada"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": [{"type": "text", "text": "Say hello again."}]},
        ],
        max_tokens=4,
        temperature=0,
    )
    assert completion.choices[0].message.content


def test_tool_call_round_trip_is_accepted(client):
    """An assistant message with tool_calls followed by a tool message is a valid conversation."""
    completion = client.chat.completions.create(
        model=NANO,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
        ],
        max_tokens=4,
        temperature=0,
    )
    assert completion.choices[0].message.role == "assistant"


def test_text_parts_equal_string_content(client):
    """A user message as one text part gives the same reply as the same text as a string."""
    request = dict(model=NANO, max_tokens=12, temperature=0)
    text = "Name three colors."
    as_string = client.chat.completions.create(
        messages=[{"role": "user", "content": text}], **request
    )
    as_parts = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], **request
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


FUNCTION = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

# One valid value (or group of values that belong together) for every field of the spec's
# CreateChatCompletionRequest besides model and messages; stream/stream_options are covered
# with a true value in test_streaming.py.
SPEC_FIELDS = {
    "metadata": {"metadata": {"purpose": "e2e"}},
    "temperature": {"temperature": 0.7},
    "top_p": {"top_p": 0.9},
    "user": {"user": "user-1234"},
    "safety_identifier": {"safety_identifier": "safety-identifier-1234"},
    "prompt_cache_key": {"prompt_cache_key": "prompt-cache-key-1234"},
    "prompt_cache_retention": {"prompt_cache_retention": "in_memory"},
    "prompt_cache_options": {"prompt_cache_options": {"ttl": "30m", "mode": "implicit"}},
    "service_tier": {"service_tier": "auto"},
    "modalities": {"modalities": ["text"]},
    "verbosity": {"verbosity": "medium"},
    "max_completion_tokens": {"max_completion_tokens": 4},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "presence_penalty": {"presence_penalty": -0.5},
    "logprobs+top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "response_format": {"response_format": {"type": "text"}},
    "audio": {"audio": None},
    "store": {"store": False},
    "moderation": {"moderation": None},
    "stream=false": {"stream": False},
    "stream_options=null": {"stream_options": None},
    "stop": {"stop": ["\n\n\n"]},
    "logit_bias": {"logit_bias": {"905": 1}},
    "n": {"n": 1},
    "prediction": {"prediction": {"type": "content", "content": "Hello there."}},
    "seed": {"seed": 42},
    "tools+tool_choice+parallel_tool_calls": {
        "tools": [{"type": "function", "function": FUNCTION}],
        "tool_choice": "none",
        "parallel_tool_calls": True,
    },
    "functions+function_call": {"functions": [FUNCTION], "function_call": "none"},
    "all_nulls": {
        key: None
        for key in (
            "temperature", "top_p", "n", "stop", "seed", "logit_bias", "logprobs",
            "top_logprobs", "presence_penalty", "frequency_penalty", "max_completion_tokens",
            "stream", "store", "metadata", "service_tier", "prediction", "response_format",
        )
    },
}


# Spec fields that ask for what these tiers do not do: refused with `unsupported_parameter`
# (as OpenAI refuses them for gpt-4.1) instead of being silently ignored. (Function calling is
# tested in test_tools.py.)
REFUSED_FIELDS = {
    "reasoning_effort": {"reasoning_effort": "medium"},
    "web_search_options": {"web_search_options": {"search_context_size": "low"}},
    "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"}},
}


@pytest.mark.parametrize("fields", REFUSED_FIELDS.values(), ids=REFUSED_FIELDS.keys())
def test_unsupported_spec_fields_are_refused_clearly(http, fields):
    """A field asking for a capability these tiers lack gets 400 naming it, never silence."""
    body = {"model": NANO, "messages": SHORT_PROMPT, "max_tokens": 4, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].split("[")[0] in fields, error
    assert error["code"] in ("unsupported_parameter", "unsupported_value"), error


@pytest.mark.parametrize("fields", SPEC_FIELDS.values(), ids=SPEC_FIELDS.keys())
def test_every_spec_field_is_accepted(http, fields):
    """Each field of the spec's CreateChatCompletionRequest is accepted (even if ignored)."""
    body = {"model": NANO, "messages": SHORT_PROMPT, "max_tokens": 4, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_the_spec_check_catches_a_body_off_the_spec(http):
    """The spec check every 2xx body goes through (spec_check.py) can fail: a real completion
    passes, the same with a wrong `object`, a null `created` or no `choices` does not."""
    import spec_check

    body = post_chat(http, max_tokens=2)
    assert spec_check.problems("CreateChatCompletionResponse", body) == []
    for broken in [{**body, "object": "chat.completions"}, {**body, "created": None},
                   {k: v for k, v in body.items() if k != "choices"}]:
        assert spec_check.problems("CreateChatCompletionResponse", broken), broken
