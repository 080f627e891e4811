"""Stored chat completions (store=true): list with model/metadata filters and pagination,
retrieve, the request messages, metadata update, delete; streaming with store; and
`ferrum export` of stored completions as fine-tuning JSONL."""

from __future__ import annotations

import subprocess
import time
import uuid

import openai
import pytest

from helpers import MINI, NANO, SHORT_PROMPT, assert_error, read_jsonl


def store(client, model: str = NANO, messages=SHORT_PROMPT, metadata: dict | None = None, **kwargs):
    """A stored completion (store=True), small and greedy."""
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("temperature", 0)
    extra = {} if metadata is None else {"metadata": metadata}
    return client.chat.completions.create(model=model, messages=messages, store=True, **extra, **kwargs)


def retrieve_stored(client, completion_id: str, timeout: float = 5.0):
    """The stored completion, re-read for up to `timeout` s (it may be written just after the
    response)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.chat.completions.retrieve(completion_id)
        except openai.NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def tag() -> str:
    """A metadata value unique to one test, so listings on the shared server see only its own."""
    return uuid.uuid4().hex


# --- create and retrieve ---------------------------------------------------------------------


def test_stored_completion_is_retrievable(client, http):
    """With store=true the completion is retrievable by its id, with its metadata, choices and
    usage as returned by the create call."""
    metadata = {"test": tag(), "k": "v"}
    created = store(client, metadata=metadata)
    # The create response echoes the metadata, as OpenAI's does for a stored completion.
    assert created.metadata == metadata, created
    stored = retrieve_stored(client, created.id)
    assert stored.id == created.id
    assert stored.object == "chat.completion"
    assert stored.model == NANO
    assert stored.created == created.created
    assert stored.choices[0].message.content == created.choices[0].message.content
    assert stored.choices[0].finish_reason == created.choices[0].finish_reason
    assert stored.usage.prompt_tokens == created.usage.prompt_tokens
    assert stored.usage.completion_tokens == created.usage.completion_tokens
    assert stored.metadata == metadata, stored

    raw = http.get(f"/v1/chat/completions/{created.id}")
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["metadata"] == metadata, body
    assert body["choices"][0]["message"]["role"] == "assistant", body


@pytest.mark.parametrize("store_flag", [False, None], ids=["store_false", "store_absent"])
def test_unstored_completion_is_not_retrievable(client, store_flag):
    """Without store=true nothing is stored: retrieving the completion's id is a 404."""
    kwargs = {} if store_flag is None else {"store": store_flag}
    unstored = client.chat.completions.create(
        model=NANO, messages=SHORT_PROMPT, max_tokens=4, temperature=0, **kwargs
    )
    # A stored completion made afterwards is visible, so any write of the first one has landed.
    marker = store(client, metadata={"test": tag()}, max_tokens=2)
    retrieve_stored(client, marker.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(unstored.id)


def test_streamed_completion_is_stored(client):
    """A streamed completion with store=true is stored under the stream's id, with the
    streamed text."""
    metadata = {"test": tag()}
    stream = client.chat.completions.create(
        model=NANO,
        messages=SHORT_PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        store=True,
        metadata=metadata,
    )
    chunks = list(stream)
    completion_id = chunks[0].id
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text, chunks
    stored = retrieve_stored(client, completion_id)
    assert stored.id == completion_id
    assert stored.choices[0].message.content == text, (stored, text)
    assert stored.metadata == metadata, stored
    assert stored.usage is not None and stored.usage.completion_tokens > 0, stored
    listed = client.chat.completions.list(metadata=metadata)
    assert [c.id for c in listed.data] == [completion_id], listed


# --- list ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_stored(client):
    """Three stored completions made one after the other (lists order them by creation, also
    within one second): nano red, nano blue, mini red, one tag."""
    run = tag()
    made = []
    for model, color in [(NANO, "red"), (NANO, "blue"), (MINI, "red")]:
        made.append(store(client, model=model, metadata={"test": run, "color": color}))
    for completion in made:
        retrieve_stored(client, completion.id)
    return run, [c.id for c in made]


def test_list_by_metadata_in_ascending_order(client, http, three_stored):
    """GET /v1/chat/completions?metadata[k]=v lists the matching completions, oldest first by
    default, as chat.completion objects with their metadata."""
    run, ids = three_stored
    listed = client.chat.completions.list(metadata={"test": run})
    assert [c.id for c in listed.data] == ids, (ids, listed)
    assert listed.has_more is False
    for completion in listed.data:
        assert completion.object == "chat.completion", completion
        assert completion.metadata["test"] == run, completion
        assert completion.choices[0].message.content, completion
        assert completion.usage is not None, completion

    body = http.get("/v1/chat/completions", params={"metadata[test]": run}).json()
    assert body["object"] == "list", body
    assert (body["first_id"], body["last_id"], body["has_more"]) == (ids[0], ids[-1], False), body


def test_list_desc_order(client, three_stored):
    run, ids = three_stored
    listed = client.chat.completions.list(metadata={"test": run}, order="desc")
    assert [c.id for c in listed.data] == ids[::-1]


def test_list_filters_combine(client, three_stored):
    """Two metadata filters must both match; model= keeps one tier's completions."""
    run, ids = three_stored
    red = client.chat.completions.list(metadata={"test": run, "color": "red"})
    assert [c.id for c in red.data] == [ids[0], ids[2]], red
    mini = client.chat.completions.list(metadata={"test": run}, model=MINI)
    assert [c.id for c in mini.data] == [ids[2]], mini
    nano_blue = client.chat.completions.list(metadata={"test": run, "color": "blue"}, model=NANO)
    assert [c.id for c in nano_blue.data] == [ids[1]], nano_blue
    none = client.chat.completions.list(metadata={"test": run, "color": "green"})
    assert none.data == [] and none.has_more is False, none


def test_list_pagination(client, three_stored):
    """limit and after page through the list; the SDK's auto-pagination yields each once."""
    run, ids = three_stored
    page1 = client.chat.completions.list(metadata={"test": run}, limit=2)
    assert [c.id for c in page1.data] == ids[:2], page1
    assert page1.has_more is True, page1
    page2 = client.chat.completions.list(metadata={"test": run}, limit=2, after=ids[1])
    assert [c.id for c in page2.data] == ids[2:], page2
    assert page2.has_more is False, page2
    assert [c.id for c in client.chat.completions.list(metadata={"test": run}, limit=1)] == ids


# --- messages --------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!", "name": "ada"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Say hello again."}]},
]


@pytest.fixture(scope="module")
def conversation(client):
    completion = store(client, messages=CONVERSATION, metadata={"test": tag()})
    retrieve_stored(client, completion.id)
    return completion.id


def test_messages_are_the_request_messages(http, conversation):
    """GET /v1/chat/completions/{id}/messages lists the request's messages in order, with ids
    <completion id>-<index>, their role, text, name, and content_parts for part arrays."""
    response = http.get(f"/v1/chat/completions/{conversation}/messages")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list", body
    data = body["data"]
    assert [m["id"] for m in data] == [f"{conversation}-{i}" for i in range(4)], body
    assert (body["first_id"], body["last_id"], body["has_more"]) == (data[0]["id"], data[-1]["id"], False), body
    assert [m["role"] for m in data] == ["system", "user", "assistant", "user"], body
    assert [m["content"] for m in data[:3]] == ["You are terse.", "Hi!", "Hello."], body
    assert data[1].get("name") == "ada", data[1]
    for message in data[:3]:
        assert message.get("content_parts") is None, message
    assert data[3]["content_parts"] == [{"type": "text", "text": "Say hello again."}], data[3]
    assert data[3]["content"] in (None, "Say hello again."), data[3]


def test_messages_pagination(client, conversation):
    """limit, after and order page through the messages."""
    ids = [f"{conversation}-{i}" for i in range(4)]
    page1 = client.chat.completions.messages.list(conversation, limit=2)
    assert [m.id for m in page1.data] == ids[:2], page1
    assert page1.has_more is True, page1
    page2 = client.chat.completions.messages.list(conversation, limit=2, after=ids[1])
    assert [m.id for m in page2.data] == ids[2:], page2
    assert page2.has_more is False, page2
    desc = client.chat.completions.messages.list(conversation, order="desc")
    assert [m.id for m in desc.data] == ids[::-1], desc
    assert [m.id for m in client.chat.completions.messages.list(conversation, limit=1)] == ids


# --- update and delete -----------------------------------------------------------------------


def test_update_replaces_metadata(client):
    """Updating a completion's metadata replaces it (old keys gone), as retrieve and the list
    filters then show."""
    old = {"test": tag(), "stage": "draft"}
    created = store(client, metadata=old)
    retrieve_stored(client, created.id)
    new = {"test": tag(), "stage": "final"}
    updated = client.chat.completions.update(created.id, metadata=new)
    assert updated.id == created.id
    assert updated.metadata == new, updated
    assert updated.choices[0].message.content == created.choices[0].message.content
    assert client.chat.completions.retrieve(created.id).metadata == new
    assert client.chat.completions.list(metadata={"test": old["test"]}).data == []
    assert [c.id for c in client.chat.completions.list(metadata={"test": new["test"]}).data] == [created.id]


def test_delete_stored_completion(client, http):
    """DELETE answers {object chat.completion.deleted, id, deleted true}; the completion and its
    messages are then 404 and it is no longer listed."""
    metadata = {"test": tag()}
    created = store(client, metadata=metadata)
    retrieve_stored(client, created.id)
    deleted = client.chat.completions.delete(created.id)
    assert (deleted.object, deleted.id, deleted.deleted) == ("chat.completion.deleted", created.id, True), deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(created.id)
    assert_error(http.get(f"/v1/chat/completions/{created.id}/messages"), 404)
    assert_error(http.delete(f"/v1/chat/completions/{created.id}"), 404)
    assert client.chat.completions.list(metadata=metadata).data == []


@pytest.mark.parametrize(
    "method, suffix, body",
    [
        ("GET", "", None),
        ("GET", "/messages", None),
        ("POST", "", {"metadata": {"a": "b"}}),
        ("DELETE", "", None),
    ],
    ids=["retrieve", "messages", "update", "delete"],
)
def test_unknown_completion_is_404(http, method, suffix, body):
    """Every stored-completion route answers 404 for an unknown id."""
    response = http.request(method, f"/v1/chat/completions/chatcmpl-doesnotexist{suffix}", json=body)
    assert_error(response, 404)


# --- export ----------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def run_export(ferrum_bin, database_url: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(ferrum_bin), "export", "--database", database_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"ferrum export {' '.join(args)} failed:\n{result.stderr[-2000:]}"
    return result


def test_export_writes_fine_tuning_jsonl(ferrum_bin, server, client, tmp_path):
    """`ferrum export` writes one {"messages": [...request..., assistant reply]} line per stored
    completion matching --model/--metadata (with "tools" when the request had tools), to --output
    or stdout."""
    run = tag()
    train_messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    train = store(
        client, messages=train_messages, tools=TOOLS, tool_choice="none",
        metadata={"test": run, "split": "train"},
    )
    held_out = store(client, metadata={"test": run, "split": "eval"})
    for completion in (train, held_out):
        retrieve_stored(client, completion.id)

    output = tmp_path / "train.jsonl"
    run_export(ferrum_bin, server.database_url, "--metadata", f"test={run}", "--metadata", "split=train",
               "--output", str(output))
    lines = read_jsonl(output.read_text())
    assert len(lines) == 1, lines
    example = lines[0]
    messages = example["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        *[(m["role"], m["content"]) for m in train_messages],
        ("assistant", train.choices[0].message.content),
    ], messages
    assert [t["function"]["name"] for t in example["tools"]] == ["get_weather"], example
    assert example["tools"][0]["function"]["parameters"] == TOOLS[0]["function"]["parameters"], example

    both = read_jsonl(run_export(ferrum_bin, server.database_url, "--metadata", f"test={run}").stdout)
    assert len(both) == 2, both
    replies = sorted(line["messages"][-1]["content"] for line in both)
    assert replies == sorted(c.choices[0].message.content for c in (train, held_out)), both
    plain = [line for line in both if line["messages"][0]["content"] == SHORT_PROMPT[0]["content"]]
    assert len(plain) == 1, both
    assert [m["role"] for m in plain[0]["messages"]] == ["user", "assistant"], plain
    assert "tools" not in plain[0], plain

    by_model = run_export(ferrum_bin, server.database_url, "--model", MINI, "--metadata", f"test={run}")
    assert read_jsonl(by_model.stdout) == [], by_model.stdout
    nano = run_export(ferrum_bin, server.database_url, "--model", NANO, "--metadata", f"test={run}")
    assert len(read_jsonl(nano.stdout)) == 2, nano.stdout
