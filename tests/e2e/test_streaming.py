"""POST /v1/chat/completions with stream=true: SSE framing, chunks, usage chunk, equivalence."""

from collections import defaultdict

import pytest

from helpers import BAN_EOS, LONG_ANSWER_PROMPT, NANO, NANO_ALIAS, assert_error, chat_body, read_stream


def stream_chat(http, **overrides) -> tuple[list[dict], bool]:
    """Sends a streaming request and returns its chunks and whether [DONE] ended the stream."""
    body = chat_body(stream=True, **overrides)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"HTTP {response.status_code}: {response.text}")
        content_type = response.headers.get("content-type", "")
        assert content_type.startswith("text/event-stream"), content_type
        return read_stream(response.iter_lines())


def texts_by_choice(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    return dict(texts)


def finish_reasons(chunks: list[dict]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice.get("finish_reason") is not None:
                reasons[choice["index"]].append(choice["finish_reason"])
    return dict(reasons)


def test_stream_chunks_follow_the_spec(http):
    """Chunks share id/created/model, start with the assistant role, end with one finish_reason and [DONE]."""
    chunks, done = stream_chat(http, model=NANO_ALIAS, messages=LONG_ANSWER_PROMPT, max_tokens=12)
    assert done, "the stream must end with data: [DONE]"
    assert len(chunks) >= 2, chunks

    first = chunks[0]
    assert first["id"].startswith("chatcmpl-"), first
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk", chunk
        assert chunk["id"] == first["id"], chunk
        assert chunk["created"] == first["created"], chunk
        assert chunk["model"] == NANO, chunk
        assert chunk["system_fingerprint"].startswith("fp_"), chunk
        assert chunk.get("usage") is None, f"usage without include_usage: {chunk}"
        assert len(chunk["choices"]) == 1, chunk
        choice = chunk["choices"][0]
        assert set(choice) >= {"index", "delta", "finish_reason"}, choice
        assert choice["index"] == 0

    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    for chunk in chunks[1:]:
        assert chunk["choices"][0]["delta"].get("role") in (None, "assistant"), chunk
    for chunk in chunks[:-1]:
        assert chunk["choices"][0]["finish_reason"] is None, chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert texts_by_choice(chunks)[0], "no content was streamed"


def test_stream_sdk(client):
    """The SDK iterates a stream into ChatCompletionChunk objects whose deltas form the reply."""
    stream = client.chat.completions.create(
        model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stream_text_equals_non_stream_text(http, client):
    """Joined deltas equal the non-streaming reply for the same request (temperature 0, seed)."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=24, temperature=0, seed=5)
    completion = client.chat.completions.create(**request)
    chunks, done = stream_chat(http, **request)
    assert done
    assert texts_by_choice(chunks)[0] == completion.choices[0].message.content
    assert finish_reasons(chunks) == {0: [completion.choices[0].finish_reason]}


def test_stream_include_usage(http, client):
    """include_usage: every chunk has usage null except a last one with no choices and the usage."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=5, temperature=0)
    completion = client.chat.completions.create(**request)
    chunks, done = stream_chat(http, stream_options={"include_usage": True}, **request)
    assert done
    *content_chunks, usage_chunk = chunks
    for chunk in content_chunks:
        assert "usage" in chunk and chunk["usage"] is None, chunk
        assert chunk["choices"], chunk
    assert usage_chunk["choices"] == [], usage_chunk
    assert usage_chunk["id"] == content_chunks[0]["id"]
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 5, usage
    assert usage["prompt_tokens"] == completion.usage.prompt_tokens, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert "cached_tokens" in usage["prompt_tokens_details"], usage
    assert finish_reasons(content_chunks) == {0: ["length"]}


def test_stream_include_usage_sdk(client):
    """The SDK exposes the final usage chunk of a stream with include_usage."""
    stream = client.chat.completions.create(
        model=NANO,
        messages=LONG_ANSWER_PROMPT,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_stream_n_two(http):
    """n=2 streams both choices, each starting with the assistant role and ending once."""
    chunks, done = stream_chat(
        http,
        messages=LONG_ANSWER_PROMPT,
        n=2,
        max_tokens=6,
        temperature=1,
        seed=11,
        logit_bias=BAN_EOS,
    )
    assert done
    first_delta: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            first_delta.setdefault(choice["index"], choice["delta"])
    assert sorted(first_delta) == [0, 1]
    assert all(delta.get("role") == "assistant" for delta in first_delta.values()), first_delta
    assert finish_reasons(chunks) == {0: ["length"], 1: ["length"]}
    texts = texts_by_choice(chunks)
    assert texts[0] and texts[1]


def test_stream_stop_sequence(http, client):
    """A stop sequence in a stream ends it with finish_reason stop and never streams the stop text."""
    request = dict(model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=32, temperature=0)
    full = client.chat.completions.create(**request).choices[0].message.content
    words = [w for w in full.split() if w.isalpha() and len(w) >= 3]
    stop = next(w for w in words[len(words) // 2:] if full.find(w) > 0)

    chunks, done = stream_chat(http, stop=stop, **request)
    assert done
    assert texts_by_choice(chunks)[0] == full[: full.find(stop)], (full, stop)
    assert finish_reasons(chunks) == {0: ["stop"]}


def test_stream_logprobs(http, client):
    """Streamed logprobs list the same tokens as the non-streaming response."""
    request = dict(
        model=NANO, messages=LONG_ANSWER_PROMPT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    completion = client.chat.completions.create(**request)
    expected = [entry.token for entry in completion.choices[0].logprobs.content]
    chunks, done = stream_chat(http, **request)
    assert done
    streamed = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice.get("logprobs") and choice["logprobs"].get("content"):
                for entry in choice["logprobs"]["content"]:
                    assert len(entry["top_logprobs"]) == 2, entry
                    streamed.append(entry["token"])
    assert streamed == expected


def test_stream_validation_error_is_json(http):
    """An invalid streaming request gets a plain JSON 400 error, not an event stream."""
    response = http.post(
        "/v1/chat/completions", json=chat_body(stream=True, temperature=5)
    )
    assert_error(response, 400, param="temperature")


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_with_stream_options(http, include_usage):
    """stream_options is accepted with stream=true whether include_usage is true or false."""
    chunks, done = stream_chat(http, max_tokens=3, stream_options={"include_usage": include_usage})
    assert done
    has_usage_chunk = chunks[-1]["choices"] == [] and chunks[-1].get("usage") is not None
    assert has_usage_chunk == include_usage
