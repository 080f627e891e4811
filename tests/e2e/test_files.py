"""The Files API: upload (multipart, purposes, per-line validation of batch and fine-tune files,
size limit), retrieve, content, list (purpose filter, order, cursor pagination) and delete."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from helpers import assert_error, batch_line, to_jsonl

PURPOSES = ["batch", "fine-tune", "user_data", "vision", "assistants", "evals"]
# Required by the spec's OpenAIFile; `expires_at` and `status_details` are present only when set
# (the spec types them as integer and string, not nullable).
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}

# A 1x1 transparent PNG, for purpose "vision".
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
)
FINE_TUNE_LINE = {
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def valid_content(purpose: str) -> bytes:
    """A small file that is valid for `purpose`."""
    if purpose == "batch":
        return to_jsonl([batch_line("a"), batch_line("b")])
    if purpose == "fine-tune":
        return to_jsonl([FINE_TUNE_LINE, FINE_TUNE_LINE])
    if purpose == "vision":
        return PNG
    return b"some notes\nfor the e2e tests\n"


def upload_raw(http, content: bytes, purpose: str | None, filename: str = "upload.jsonl"):
    """POST /v1/files as multipart form data (no purpose field when `purpose` is None)."""
    data = {} if purpose is None else {"purpose": purpose}
    return http.post("/v1/files", files={"file": (filename, content)}, data=data)


@pytest.fixture(scope="module")
def files_server(server_factory):
    """A server of this module (its own database, so listings hold only this module's files)
    with an upload limit of 1 MiB."""
    return server_factory("--max-file-mib", "1")


# --- upload ----------------------------------------------------------------------------------


def test_upload_returns_file_object(http):
    """An upload answers the file object of the spec: id file-..., bytes, filename, purpose,
    status processed, and no status_details or expires_at (the file does not expire)."""
    content = b"hello, files\n"
    before = int(time.time())
    response = upload_raw(http, content, "user_data", filename="notes.txt")
    after = int(time.time())
    assert response.status_code == 200, response.text
    body = response.json()
    assert FILE_KEYS <= body.keys(), f"file object lacks {sorted(FILE_KEYS - body.keys())}: {body}"
    assert isinstance(body["id"], str) and body["id"].startswith("file-"), body
    assert body["object"] == "file", body
    assert body["bytes"] == len(content), body
    assert before - 1 <= body["created_at"] <= after + 1, body
    assert body["filename"] == "notes.txt", body
    assert body["purpose"] == "user_data", body
    assert body["status"] == "processed", body
    assert "status_details" not in body and "expires_at" not in body, body


def test_expires_after_sets_expires_at(client):
    """`expires_after` (anchor created_at, seconds) gives `expires_at`; the file is served until
    then (expired files are hidden at once and deleted by the server's reaper)."""
    f = client.files.create(
        file=("notes.txt", b"short-lived\n"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at == f.created_at + 3600, f
    assert client.files.retrieve(f.id).expires_at == f.expires_at
    assert f.id in {x.id for x in client.files.list(purpose="user_data")}
    assert client.files.content(f.id).read() == b"short-lived\n"


@pytest.mark.parametrize("purpose", PURPOSES)
def test_every_upload_purpose_is_accepted(client, purpose):
    """Each purpose a client may upload with is accepted and kept on the file."""
    content = valid_content(purpose)
    uploaded = client.files.create(file=(f"{purpose}.bin", content), purpose=purpose)
    assert uploaded.purpose == purpose, uploaded
    assert uploaded.bytes == len(content), uploaded
    assert client.files.retrieve(uploaded.id).purpose == purpose


def test_ids_are_unique(client):
    """Two uploads of the same content are two files."""
    first = client.files.create(file=("same.txt", b"same\n"), purpose="user_data")
    second = client.files.create(file=("same.txt", b"same\n"), purpose="user_data")
    assert first.id != second.id


@pytest.mark.parametrize("purpose", ["batch_output", "fine-tune-results", "wizardry", ""])
def test_unknown_purpose_is_rejected(http, purpose):
    """A purpose outside the uploadable ones is a 400 on param purpose."""
    assert_error(upload_raw(http, b"x\n", purpose), 400, param="purpose")


def test_missing_purpose_is_rejected(http):
    """An upload without a purpose field is a 400."""
    assert_error(upload_raw(http, b"x\n", None), 400)


def test_missing_file_is_rejected(http):
    """A form with a purpose but no file part is a 400."""
    assert_error(http.post("/v1/files", files={"purpose": (None, "user_data")}), 400)


@pytest.mark.parametrize("purpose", ["batch", "fine-tune", "user_data"])
def test_empty_file_is_rejected(http, purpose):
    """An empty file is a 400, whatever its purpose."""
    assert_error(upload_raw(http, b"", purpose), 400)


def test_a_batch_file_with_bad_lines_is_stored(client, http):
    """A purpose "batch" upload is stored as it is (its lines are checked when a batch is
    created on it, see test_batches.py), as OpenAI does."""
    content = to_jsonl([batch_line("ok-1")]) + b"{not json\n"
    uploaded = upload_raw(http, content, "batch")
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["bytes"] == len(content)
    assert client.files.content(uploaded.json()["id"]).read() == content


BAD_FINE_TUNE_LINES = {
    "not_json": b'{"messages": [',
    "missing_messages": json.dumps({"prompt": "hi", "completion": "there"}).encode(),
    "messages_not_array": json.dumps({"messages": "hi"}).encode(),
    "not_an_object": b'"just a string"',
}


@pytest.mark.parametrize("bad", BAD_FINE_TUNE_LINES.values(), ids=BAD_FINE_TUNE_LINES.keys())
def test_invalid_fine_tune_file_names_the_line(http, bad):
    """A fine-tune file whose 3rd line is not a chat example (a messages array) is a 400 whose
    message names line 3."""
    content = to_jsonl([FINE_TUNE_LINE, FINE_TUNE_LINE]) + bad + b"\n" + to_jsonl([FINE_TUNE_LINE])
    error = assert_error(upload_raw(http, content, "fine-tune"), 400)
    assert "line 3" in error["message"], error


def test_invalid_lines_rejected_only_for_fine_tune(client):
    """The same non-JSON text is a fine user_data file."""
    content = b"line 1\nline 2\n{not json\n"
    uploaded = client.files.create(file=("free.txt", content), purpose="user_data")
    assert uploaded.bytes == len(content)


def test_upload_over_the_size_limit_is_rejected(files_server):
    """With --max-file-mib 1, a 2 MiB upload is refused (413 or 400, error shape) and nothing is
    stored, while a 512 KiB one is accepted."""
    with files_server.http() as http:
        before = {f["id"] for f in http.get("/v1/files").json()["data"]}
        try:
            response = upload_raw(http, b"a" * (2 << 20), "user_data", filename="big.txt")
        except httpx.TransportError as error:
            pytest.fail(f"the server dropped the connection instead of answering: {error!r}")
        assert response.status_code in (400, 413), (response.status_code, response.text[:500])
        assert_error(response, response.status_code)
        after = {f["id"] for f in http.get("/v1/files").json()["data"]}
        assert after == before, f"a refused upload was stored: {after - before}"
        small = upload_raw(http, b"a" * (512 << 10), "user_data", filename="small.txt")
        assert small.status_code == 200, small.text[:500]
        assert small.json()["bytes"] == 512 << 10


# --- retrieve, content, delete ---------------------------------------------------------------


def test_retrieve_matches_upload(client):
    """GET /v1/files/{id} returns the same object as the upload."""
    uploaded = client.files.create(file=("r.txt", b"retrieve me\n"), purpose="user_data")
    assert client.files.retrieve(uploaded.id) == uploaded


def test_content_returns_the_exact_bytes(client):
    """GET /v1/files/{id}/content returns the uploaded bytes unchanged (binary-safe)."""
    content = bytes(range(256)) * 16 + "\r\nünïcödé ✓\n".encode("utf-8")
    uploaded = client.files.create(file=("blob.bin", content), purpose="user_data")
    assert client.files.content(uploaded.id).content == content


def test_content_of_a_batch_file(client):
    """A batch file's content is the uploaded JSONL, byte for byte."""
    content = to_jsonl([batch_line(f"c-{i}", max_tokens=i + 1) for i in range(3)])
    uploaded = client.files.create(file=("batch.jsonl", content), purpose="batch")
    assert client.files.content(uploaded.id).content == content


def test_delete_file(client, http):
    """DELETE answers {id, object file, deleted true}; the file is then gone from retrieve,
    content, the list and a second delete (404)."""
    uploaded = client.files.create(file=("doomed.txt", b"bye\n"), purpose="user_data")
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (uploaded.id, "file", True), deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert_error(http.get(f"/v1/files/{uploaded.id}/content"), 404)
    assert_error(http.delete(f"/v1/files/{uploaded.id}"), 404)
    assert uploaded.id not in {f.id for f in client.files.list(purpose="user_data")}


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("GET", "/content"), ("DELETE", "")])
def test_unknown_file_is_404(http, method, suffix):
    """Retrieve, content and delete of an unknown file id are 404s in the error shape."""
    assert_error(http.request(method, f"/v1/files/file-doesnotexist{suffix}"), 404)


def test_sdk_retrieve_unknown_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve("file-doesnotexist")
    assert caught.value.status_code == 404


# --- list ------------------------------------------------------------------------------------


def test_list_shape(http):
    """GET /v1/files is {object list, data, first_id, last_id, has_more} of file objects."""
    upload_raw(http, b"listed\n", "user_data")
    body = http.get("/v1/files").json()
    assert body["object"] == "list", body
    assert {"data", "first_id", "last_id", "has_more"} <= body.keys(), body
    assert body["data"], body
    for entry in body["data"]:
        assert FILE_KEYS <= entry.keys(), entry
    assert body["first_id"] == body["data"][0]["id"], body
    assert body["last_id"] == body["data"][-1]["id"], body


def test_list_order_and_pagination(files_server):
    """Listing is newest first by default; order=asc reverses it; limit and after page through
    the files, and has_more/first_id/last_id describe each page. Files made one after the other
    keep their creation order, also within one second."""
    client = files_server.client()
    ids = []
    for i in range(3):
        ids.append(client.files.create(file=(f"e{i}.jsonl", b'{"i": %d}\n' % i), purpose="evals").id)

    with files_server.http() as http:
        desc = http.get("/v1/files", params={"purpose": "evals"}).json()
        assert [f["id"] for f in desc["data"]] == ids[::-1], (ids, desc)
        assert desc["has_more"] is False, desc
        explicit = http.get("/v1/files", params={"purpose": "evals", "order": "desc"}).json()
        assert [f["id"] for f in explicit["data"]] == ids[::-1], (ids, explicit)
        asc = http.get("/v1/files", params={"purpose": "evals", "order": "asc"}).json()
        assert [f["id"] for f in asc["data"]] == ids, (ids, asc)

        page1 = http.get("/v1/files", params={"purpose": "evals", "limit": 2}).json()
        assert [f["id"] for f in page1["data"]] == [ids[2], ids[1]], page1
        assert page1["has_more"] is True, page1
        assert (page1["first_id"], page1["last_id"]) == (ids[2], ids[1]), page1
        page2 = http.get(
            "/v1/files", params={"purpose": "evals", "limit": 2, "after": page1["last_id"]}
        ).json()
        assert [f["id"] for f in page2["data"]] == [ids[0]], page2
        assert page2["has_more"] is False, page2
        asc_page = http.get(
            "/v1/files", params={"purpose": "evals", "order": "asc", "after": ids[0]}
        ).json()
        assert [f["id"] for f in asc_page["data"]] == ids[1:], asc_page

    # The SDK's auto-pagination walks the pages (limit 1: three requests).
    assert [f.id for f in client.files.list(purpose="evals", limit=1)] == ids[::-1]


def test_list_filters_by_purpose(files_server):
    """purpose= keeps only that purpose's files; no filter lists them all."""
    client = files_server.client()
    tune = client.files.create(file=("t.jsonl", valid_content("fine-tune")), purpose="fine-tune")
    notes = client.files.create(file=("n.txt", b"n\n"), purpose="assistants")
    tuned = list(client.files.list(purpose="fine-tune"))
    assert tune.id in {f.id for f in tuned}, tuned
    assert all(f.purpose == "fine-tune" for f in tuned), tuned
    everything = {f.id for f in client.files.list()}
    assert {tune.id, notes.id} <= everything


def test_list_is_empty_for_an_unused_purpose(files_server):
    """A purpose with no files lists nothing, with has_more false."""
    with files_server.http() as http:
        body = http.get("/v1/files", params={"purpose": "vision"}).json()
    assert body["data"] == [] and body["has_more"] is False, body
