"""The server as a process: API keys, queue limits, disconnects, concurrency, shutdown."""

import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from helpers import (
    BAN_EOS,
    LONG_ANSWER_PROMPT,
    NANO,
    SHORT_PROMPT,
    assert_error,
    assert_error_shape,
    chat_body,
    read_stream,
    sse_data,
    usage_by_model,
)

API_KEY = "sk-ferrum-e2e-secret"


# --- API keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(server_factory):
    """A server started with --api-key."""
    return server_factory("--api-key", API_KEY)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/chat/completions", chat_body(max_tokens=2)),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{NANO}", None),
        ("GET", "/admin/models", None),
    ],
)
def test_api_key_required(keyed_server, method, path, body):
    """With --api-key, a request without Authorization or with a wrong key is a 401."""
    with keyed_server.http() as http:
        missing = http.request(method, path, json=body)
        assert_error(missing, 401)
        wrong = http.request(
            method, path, json=body, headers={"Authorization": "Bearer sk-wrong"}
        )
        assert_error(wrong, 401, code="invalid_api_key")
        right = http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert right.status_code == 200, right.text


def test_api_key_sdk(keyed_server):
    """The SDK with the right key works; with a wrong key it raises AuthenticationError."""
    completion = keyed_server.client(api_key=API_KEY).chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=2, temperature=0
    )
    assert completion.choices[0].message.content
    assert {m.id for m in keyed_server.client(api_key=API_KEY).models.list()} >= {NANO}

    with pytest.raises(openai.AuthenticationError) as caught:
        keyed_server.client(api_key="sk-wrong").models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


# --- queue limit -----------------------------------------------------------------------------


def test_full_queue_answers_429(server_factory):
    """With one running sequence and a queue of 1, a burst of 6 long requests gets 429s (error
    shape, Retry-After) and the rest succeed."""
    server = server_factory("--queue-size", "1", "--max-running", "1")
    client = server.client()
    barrier = threading.Barrier(6)
    outcomes: list = [None] * 6

    def request(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = client.chat.completions.create(
                model=NANO,
                messages=LONG_ANSWER_PROMPT,
                max_tokens=120,
                temperature=0,
                logit_bias=BAN_EOS,
            )
        except Exception as error:  # noqa: BLE001 - every outcome is inspected below
            outcomes[i] = error

    threads = [threading.Thread(target=request, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    succeeded = [o for o in outcomes if isinstance(o, ChatCompletion)]
    others = [o for o in outcomes if not isinstance(o, (openai.RateLimitError, ChatCompletion))]
    assert not others, f"outcomes other than success or 429: {others!r}"
    assert limited, "no request was refused with 429 although the queue holds 1"
    assert succeeded, "every request was refused"
    for error in limited:
        assert error.status_code == 429
        assert_error_shape(error.response.json())
        assert int(error.response.headers["retry-after"]) >= 1
    for completion in succeeded:
        assert completion.usage.completion_tokens == 120
        assert completion.choices[0].finish_reason == "length"

    # Once the burst is over the server serves normally.
    assert client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=2
    ).choices[0].message.content
    # A refused request costs nothing: the ledger holds the answered ones only.
    with server.http() as http:
        assert usage_by_model(http)[NANO]["requests"] == len(succeeded) + 1


# --- client disconnect -----------------------------------------------------------------------


def test_client_disconnect_frees_the_worker(server_factory):
    """Closing a long stream early stops its generation: the next request is served at once."""
    server = server_factory()
    with server.http() as http:
        body = chat_body(
            stream=True, messages=LONG_ANSWER_PROMPT, max_tokens=4000, logit_bias=BAN_EOS
        )
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            data = sse_data(response.iter_lines())
            next(data)
            next(data)
        # Leaving the block closed the connection with 4000 tokens still to generate.
        started = time.monotonic()
        follow_up = http.post("/v1/chat/completions", json=chat_body(max_tokens=8))
        elapsed = time.monotonic() - started
    assert follow_up.status_code == 200, follow_up.text
    assert elapsed < 10, f"the follow-up took {elapsed:.1f} s: the abandoned stream kept the worker"


# --- concurrency -----------------------------------------------------------------------------

CONCURRENT_PROMPTS = [
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Count from 1 to 10, separated by commas.",
]


def test_concurrent_requests(client):
    """Four simultaneous requests all succeed, each with the reply it gets when sent alone."""
    def ask(prompt: str):
        return client.chat.completions.create(
            model=NANO,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=0,
        )

    alone = [ask(prompt).choices[0].message.content for prompt in CONCURRENT_PROMPTS]

    barrier = threading.Barrier(len(CONCURRENT_PROMPTS))
    together: list = [None] * len(CONCURRENT_PROMPTS)

    def run(i: int) -> None:
        barrier.wait()
        try:
            together[i] = ask(CONCURRENT_PROMPTS[i]).choices[0].message.content
        except Exception as error:  # noqa: BLE001
            together[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CONCURRENT_PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone


# --- startup and shutdown --------------------------------------------------------------------


def test_sigterm_mid_stream(server_factory):
    """SIGTERM during a stream: the stream ends cleanly, the process exits 0, new connections fail."""
    server = server_factory()
    body = chat_body(stream=True, messages=LONG_ANSWER_PROMPT, max_tokens=64, logit_bias=BAN_EOS)
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            # Wait for the first content chunk: the request is in flight.
            for line in lines:
                if line.startswith("data:"):
                    break
            server.signal(signal.SIGTERM)
            try:
                chunks, done = read_stream(lines)
            except httpx.HTTPError as error:
                pytest.fail(f"the stream broke after SIGTERM: {error!r}")
    if done:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]

    try:
        code = server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ferrum serve did not exit within 15 s of SIGTERM\n{server.describe()}")
    assert code == 0, f"exit code {code}\n{server.describe()}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/v1/models", timeout=5)


def test_sigterm_lets_in_flight_request_finish(server_factory):
    """A non-streaming request in flight at SIGTERM still gets its full response."""
    server = server_factory()
    result: dict = {}

    def request() -> None:
        with server.http() as http:
            try:
                result["response"] = http.post(
                    "/v1/chat/completions",
                    json=chat_body(messages=LONG_ANSWER_PROMPT, max_tokens=48, logit_bias=BAN_EOS),
                )
            except httpx.HTTPError as error:
                result["error"] = error

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.5)  # the request has reached the server (loopback)
    server.signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert "error" not in result, f"the in-flight request failed: {result['error']!r}"
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 48
    assert server.process.wait(timeout=15) == 0


def test_sigint_exits_zero_and_prints_one_line(server_factory):
    """SIGINT shuts the server down with exit code 0; stdout held only the listening line."""
    server = server_factory()
    with server.http() as http:
        assert http.get("/v1/models").status_code == 200
    server.signal(signal.SIGINT)
    assert server.process.wait(timeout=15) == 0, server.describe()
    assert server.all_stdout() == [f"ferrum listening on http://127.0.0.1:{server.port}\n"]
