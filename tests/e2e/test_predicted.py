"""Predicted outputs: `prediction` makes the server verify the predicted tokens several per step;
the output is token for token the output without it, whatever the prediction, and the usage counts
accepted and rejected prediction tokens (rejected ones billed as output, as OpenAI does)."""

from __future__ import annotations

import pytest

from helpers import BAN_EOS, NANO, assert_error

ASK = [{"role": "user", "content": "Write a short poem about the sea."}]


def create(client, prediction=None, **kwargs):
    kwargs.setdefault("max_tokens", 48)
    kwargs.setdefault("temperature", 0)
    if prediction is not None:
        kwargs["prediction"] = {"type": "content", "content": prediction}
    return client.chat.completions.create(model=NANO, messages=ASK, **kwargs)


@pytest.fixture(scope="module")
def plain(client):
    return create(client)


def edited(text: str) -> str:
    words = text.split(" ")
    return " ".join(w.upper() if i % 5 == 2 else w for i, w in enumerate(words))


@pytest.mark.parametrize("kind", ["exact", "edited", "unrelated", "empty", "parts"])
def test_any_prediction_gives_the_same_output(client, plain, kind):
    text = plain.choices[0].message.content
    prediction = {
        "exact": text,
        "edited": edited(text),
        "unrelated": "The mountains are tall and the goats climb them every day. " * 4,
        "empty": "",
        "parts": [{"type": "text", "text": text[: len(text) // 2]}, {"type": "text", "text": text[len(text) // 2:]}],
    }[kind]
    got = create(client, prediction)
    assert got.choices[0].message.content == text
    assert got.choices[0].finish_reason == plain.choices[0].finish_reason
    details = got.usage.completion_tokens_details
    generated = plain.usage.completion_tokens
    # Rejected prediction tokens are billed as output on top of the generated ones.
    assert got.usage.completion_tokens == generated + details.rejected_prediction_tokens
    assert details.accepted_prediction_tokens <= generated
    if kind == "exact":
        assert details.accepted_prediction_tokens >= generated * 0.7, details
        assert details.rejected_prediction_tokens == 0
    if kind == "empty":
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)


def test_sampling_with_a_seed_is_unchanged_too(client):
    kwargs = dict(temperature=0.9, seed=5, max_tokens=40)
    without = create(client, **kwargs)
    text = without.choices[0].message.content
    with_it = create(client, text, **kwargs)
    assert with_it.choices[0].message.content == text
    assert with_it.usage.completion_tokens_details.accepted_prediction_tokens > 0


def test_streaming_with_stop_and_max_tokens(client):
    """A prediction with streaming, a stop sequence and a token limit: the same chunks' text."""
    kwargs = dict(max_tokens=40, logit_bias=BAN_EOS, stop=["\n\n"])
    plain = create(client, **kwargs)
    text = plain.choices[0].message.content
    stream = create(client, text + " and more words after it", stream=True,
                    stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 0


def test_a_bad_prediction_is_a_400(http):
    body = {"model": NANO, "messages": ASK, "prediction": {"type": "diff", "content": "x"}}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="prediction.type")
    body["prediction"] = {"type": "content", "content": 5}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="prediction.content")
